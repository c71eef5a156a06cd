//! The ConnectRPC library's rough edges, smoothed for every server of
//! ours: a caller is told what it got wrong in words it can act on.

use axum::http::StatusCode;
use connectrpc::ConnectError;

/// The JSON decoder of the RPC library calls an enum name it does not
/// know an "unknown variant" of an enum with "no variants"; a caller
/// deserves to hear that the value is not one of the field's and how
/// values are spelled.
pub fn clarify_decode_error(mut error: ConnectError) -> ConnectError {
    const UNKNOWN: &str = "unknown variant `";
    const NO_VARIANTS: &str = "`, there are no variants";
    let Some(message) = error.message.as_deref() else { return error };
    let Some((before, rest)) = message.split_once(UNKNOWN) else { return error };
    let Some((value, after)) = rest.split_once(NO_VARIANTS) else { return error };
    let clarified = format!(
        "{before}{value:?} is not a value of this enum field{after}; enum values are written in full, as the contract names them \
         (VM_STATE_RUNNING, NETWORK_MODE_IPV6_ONLY), or as their numbers"
    );
    error.message = Some(clarified);
    error
}

/// The Connect protocol answers a content type it does not take with a
/// bare 415; a caller deserves to hear which ones it does take.
pub async fn explain_unsupported_media_type(response: axum::response::Response) -> axum::response::Response {
    if response.status() != StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return response;
    }
    let message = "unsupported content type: send application/json or application/proto (Connect), \
                   application/connect+json or application/connect+proto (Connect streams), \
                   application/grpc or application/grpc-web\n";
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    parts.headers.remove(http::header::CONTENT_LENGTH);
    axum::response::Response::from_parts(parts, axum::body::Body::from(message))
}
