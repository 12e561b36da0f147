"""Where DDP ranks meet: rank 0's address and each rank's socket interface, chosen without host names.

torch.distributed needs an address of rank 0 that every rank can reach (the TCP store) and, for gloo
and NCCL, an interface per rank to bind its data sockets to. Host names are not reliable for either:
on many clusters the node name resolves only on the login node, or to a management network, and gloo
picks its interface by resolving the local host name, falling back to 127.0.0.1 when that fails (its
peers on other nodes then cannot connect). So the ranks exchange their interfaces over MPI (the
launcher's channel, already up under mpiexec and srun) and:

- rank 0 offers the address of its interface that is on a subnet shared with every other node (the
  one the kernel routes to the first remote node when several are); when no subnet is shared, the
  source address the kernel picks for the route to the first remote node; ``127.0.0.1`` when every
  rank runs on rank 0's node;
- every rank binds gloo/NCCL to its own interface that routes to that address
  (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``), unless the user set them.

``MEDFLOW_RDZV_HOST`` forces rank 0's address; a ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` the user
set on rank 0 that names one of its interfaces makes that interface's address the one offered.
The choice is pure (``choose_root``, ``interface_towards``) and unit-tested; the system queries
(``local_interfaces``, ``route_source``) are small and Linux-only (ioctl), as SLURM clusters are.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Environment variables naming the socket interface of each torch.distributed backend.
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
LOOPBACK = "127.0.0.1"

_SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFNETMASK = 0x8913, 0x8915, 0x891B
_IFF_UP = 0x1


class RendezvousError(RuntimeError):
    """No address of rank 0 is reachable by the other ranks."""


@dataclass(frozen=True)
class Interface:
    """An IPv4 interface of a node: name, address, prefix length."""

    name: str
    address: str
    prefix: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.address}/{self.prefix}", strict=False)

    @property
    def loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_loopback


@dataclass(frozen=True)
class Rendezvous:
    """Rank 0's address and the interface this rank binds to (None: leave it to the backend)."""

    address: str
    port: int
    interface: str | None
    source: str  # how the address was chosen: subnet | route | local | MEDFLOW_RDZV_HOST | <IFNAME var>


# ---- system queries ---------------------------------------------------------------------------------
def local_interfaces() -> list[Interface]:
    """The IPv4 interfaces that are up, in the kernel's index order (loopback included)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)[16:18])[0]
                if not flags & _IFF_UP:
                    continue
                address = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)[20:24])
                netmask = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, request)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
            found.append(Interface(name, address, ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen))
    return found


def route_source(destination: str) -> str | None:
    """The local address the kernel uses to reach ``destination`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((destination, 9))
        except OSError:  # no route
            return None
        return str(sock.getsockname()[0])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# ---- the choice (pure) ------------------------------------------------------------------------------
def same_node(a: Sequence[Interface], b: Sequence[Interface]) -> bool:
    """Two ranks share a node (a network namespace) when they share a non-loopback address."""
    return bool({i.address for i in a if not i.loopback} & {i.address for i in b if not i.loopback})


def interface_of(address: str, interfaces: Sequence[Interface]) -> Interface | None:
    for iface in interfaces:
        if iface.address == address:
            return iface
    return None


def user_interface(env: Mapping[str, str], interfaces: Sequence[Interface]) -> tuple[Interface, str] | None:
    """The interface a user named in GLOO_/NCCL_SOCKET_IFNAME, if it is one of ``interfaces``.

    Only a plain name counts (first of a comma list, NCCL's leading ``=`` dropped); NCCL's prefix and
    ``^``-exclusion forms are left to NCCL."""
    for var in IFNAME_VARS:
        first = env.get(var, "").split(",")[0].strip().lstrip("=")
        for iface in interfaces:
            if first and iface.name == first:
                return iface, var
    return None


def choose_root(
    root: Sequence[Interface],
    peers: Sequence[Sequence[Interface]],
    route: Callable[[str], str | None] = route_source,
) -> tuple[str, str]:
    """(address, how) that rank 0 offers, from its interfaces and those of every other rank."""
    remote = [p for p in peers if not same_node(root, p)]
    if not remote:
        return LOOPBACK, "local"
    own = [i for i in root if not i.loopback]
    first_remote = next((i.address for i in remote[0] if not i.loopback), None)
    routed = interface_of(route(first_remote) or "", own) if first_remote else None
    shared = [i for i in own if all(any(j.network == i.network for j in peer if not j.loopback) for peer in remote)]
    if shared:
        return (routed if routed in shared else shared[0]).address, "subnet"
    if routed is not None:
        return routed.address, "route"
    raise RendezvousError(
        f"rank 0 has no interface on a subnet of every node and no route to {first_remote}; "
        "set MEDFLOW_RDZV_HOST to an address of rank 0's node that every node reaches"
    )


def interface_towards(
    address: str, interfaces: Sequence[Interface], route: Callable[[str], str | None] = route_source
) -> str | None:
    """Name of this rank's interface whose address the kernel uses to reach ``address``."""
    if ipaddress.IPv4Address(address).is_loopback:
        loop = next((i for i in interfaces if i.loopback), None)
        return loop.name if loop else None
    own = interface_of(address, interfaces)  # rank 0's own node: the interface holding the address
    if own is not None:
        return own.name
    iface = interface_of(route(address) or "", interfaces)
    return iface.name if iface else None


def bind_interface(name: str | None, env: MutableMapping[str, str]) -> dict[str, str]:
    """Set GLOO_/NCCL_SOCKET_IFNAME to ``name`` where the user did not; returns what is in effect."""
    if name:
        for var in IFNAME_VARS:
            env.setdefault(var, name)
    return {var: env[var] for var in IFNAME_VARS if var in env}


# ---- with the launcher --------------------------------------------------------------------------------
def agree(comm: Any, env: MutableMapping[str, str] | None = None) -> Rendezvous:
    """Collective over ``comm`` (an mpi4py communicator): rank 0's address and port, and this rank's
    interface toward it, set in ``env`` (os.environ) for gloo and NCCL unless the user set them."""
    env = os.environ if env is None else env
    mine = local_interfaces()
    everyone = comm.gather(mine, root=0)
    offer: tuple[str, str, int, str] | None = None
    if comm.Get_rank() == 0:
        try:
            offer = ("ok", *_root_offer(mine, everyone[1:], env))
        except RendezvousError as exc:  # every rank must leave the collective, then all raise
            offer = ("error", str(exc), 0, "")
    status, address, port, source = comm.bcast(offer, root=0)
    if status != "ok":
        raise RendezvousError(address)
    name = interface_towards(numeric, mine) if (numeric := _numeric(address)) else None
    bind_interface(name, env)
    return Rendezvous(address, port, name, source)


def _numeric(address: str) -> str | None:
    """``address`` as an IPv4 address (a host name from MEDFLOW_RDZV_HOST is resolved), else None."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        try:
            return socket.gethostbyname(address)
        except OSError:
            return None


def _root_offer(mine: list[Interface], peers: list[list[Interface]], env: Mapping[str, str]) -> tuple[str, int, str]:
    port = free_port()
    if env.get("MEDFLOW_RDZV_HOST"):
        return env["MEDFLOW_RDZV_HOST"], port, "MEDFLOW_RDZV_HOST"
    named = user_interface(env, mine)
    if named is not None:
        return named[0].address, port, named[1]
    address, how = choose_root(mine, peers)
    return address, port, how
