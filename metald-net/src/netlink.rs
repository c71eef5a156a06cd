//! The netlink calls metald makes, each in the namespace it is meant for:
//! a connection's socket is made on a thread that has joined that
//! namespace, and every request on it acts there.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, TokioSocket};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};

use crate::netns::run_in;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error("cannot {action} {link}")]
    Request {
        action: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no link named {0}")]
    NoSuchLink(String),
}

fn request<'a>(action: &'static str, link: &'a str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError + 'a {
    move |source| NetlinkError::Request { action, link: link.to_owned(), source }
}

/// A netlink connection bound to one network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn is_errno(error: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message) if message.raw_code() == -(errno as i32))
}

impl Netlink {
    /// A connection in `namespace`, or in our own when `None`. Must be
    /// called inside a Tokio runtime.
    pub fn connect(namespace: Option<BorrowedFd<'_>>) -> Result<Self, NetlinkError> {
        let socket = match namespace {
            None => Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?,
            Some(namespace) => run_in(namespace, || Socket::new(NETLINK_ROUTE))
                .map_err(|error| NetlinkError::Socket(io::Error::other(error)))?
                .map_err(|errno| NetlinkError::Socket(errno.into()))?
                .map_err(NetlinkError::Socket)?,
        };
        socket.set_non_blocking(true).map_err(NetlinkError::Socket)?;
        // SAFETY: the descriptor comes from a socket we just made and give away here.
        let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The index of link `name`, if it exists.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        match self.handle.link().get().match_name(name.to_owned()).execute().try_next().await {
            Ok(Some(message)) => Ok(Some(message.header.index)),
            Ok(None) => Ok(None),
            Err(error) if is_errno(&error, nix::errno::Errno::ENODEV) => Ok(None),
            Err(source) => Err(NetlinkError::Request { action: "look up", link: name.to_owned(), source }),
        }
    }

    async fn require(&self, name: &str) -> Result<u32, NetlinkError> {
        self.index(name).await?.ok_or_else(|| NetlinkError::NoSuchLink(name.to_owned()))
    }

    /// A veth pair: `host_end` here, `peer_end` born in `peer_namespace`.
    pub async fn add_veth(&self, host_end: &str, peer_end: &str, peer_namespace: impl AsFd) -> Result<(), NetlinkError> {
        let peer = LinkUnspec::new_with_name(peer_end).setns_by_fd(peer_namespace.as_fd().as_raw_fd()).build();
        let message = LinkVeth::new(host_end, peer_end).set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build();
        self.handle.link().add(message).execute().await.map_err(request("create the veth pair", host_end))
    }

    /// A bridge that floods multicast (no snooping), so neighbour discovery
    /// works without an MLD querier.
    pub async fn add_bridge(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkBridge::new(name).mcast_snooping(false).mtu(mtu).build())
            .execute()
            .await
            .map_err(request("create the bridge", name))
    }

    pub async fn set_master(&self, name: &str, bridge: &str) -> Result<(), NetlinkError> {
        let (index, bridge_index) = (self.require(name).await?, self.require(bridge).await?);
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).controller(bridge_index).build())
            .execute()
            .await
            .map_err(request("enslave", name))
    }

    pub async fn up(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let index = self.require(name).await?;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).up().mtu(mtu).build())
            .execute()
            .await
            .map_err(request("bring up", name))
    }

    /// Deletes link `name`; one that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(index) = self.index(name).await? else { return Ok(()) };
        match self.handle.link().del(index).execute().await {
            Err(error) if is_errno(&error, nix::errno::Errno::ENODEV) => Ok(()),
            other => other.map_err(request("delete", name)),
        }
    }

    /// Adds an IPv6 address without duplicate address detection (we own the prefix).
    pub async fn add_address6(&self, name: &str, address: Ipv6Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        let index = self.require(name).await?;
        let mut add = self.handle.address().add(index, address.into(), prefix_len);
        add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        add.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        match add.execute().await {
            Err(error) if is_errno(&error, nix::errno::Errno::EEXIST) => Ok(()),
            other => other.map_err(request("add an IPv6 address to", name)),
        }
    }

    pub async fn add_address4(&self, name: &str, address: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        let index = self.require(name).await?;
        match self.handle.address().add(index, address.into(), prefix_len).execute().await {
            Err(error) if is_errno(&error, nix::errno::Errno::EEXIST) => Ok(()),
            other => other.map_err(request("add an IPv4 address to", name)),
        }
    }

    /// The names of every link here.
    pub async fn links(&self) -> Result<Vec<String>, NetlinkError> {
        let mut links = self.handle.link().get().execute();
        let mut names = Vec::new();
        while let Some(message) = links.try_next().await.map_err(request("list", "links"))? {
            for attribute in message.attributes {
                if let rtnetlink::packet_route::link::LinkAttribute::IfName(name) = attribute {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }
}
