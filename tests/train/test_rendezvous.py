"""DDP rendezvous without host names (`medflow.train.rendezvous`): rank 0's address, each rank's interface."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from conftest import ROOT, VENV_BIN, mpi_launcher
from medflow.train import rendezvous as rv
from medflow.train.rendezvous import Interface

LO = Interface("lo", "127.0.0.1", 8)


def node(*ifaces: tuple[str, str, int]) -> list[Interface]:
    return [LO, *(Interface(*i) for i in ifaces)]


# A two-network cluster: ethernet 10.1.0.0/16 on every node, InfiniBand (IPoIB) 192.168.5.0/24 on some.
NODE1 = node(("eth0", "10.1.0.11", 16), ("ib0", "192.168.5.11", 24))
NODE2 = node(("eth0", "10.1.0.12", 16), ("ib0", "192.168.5.12", 24))
NODE3_NO_IB = node(("eth0", "10.1.0.13", 16))


def routes(table: dict[str, str]):
    """A fake kernel routing decision: destination → source address (None: no route)."""
    return lambda dest: table.get(dest)


def test_all_ranks_on_rank0s_node_meet_on_loopback():
    address, how = rv.choose_root(NODE1, [NODE1, NODE1], route=routes({}))
    assert (address, how) == ("127.0.0.1", "local")
    assert rv.interface_towards(address, NODE1, route=routes({})) == "lo"


def test_shared_subnet_preferred_in_route_order():
    # Both networks reach node2; the kernel routes node2's first address (eth0) via eth0: eth0 wins.
    assert rv.choose_root(NODE1, [NODE2], route=routes({"10.1.0.12": "10.1.0.11"})) == ("10.1.0.11", "subnet")
    # A node without IPoIB: only ethernet is shared by every node, whatever the route to the first says.
    ib_route = routes({"10.1.0.12": "192.168.5.11"})
    assert rv.choose_root(NODE1, [NODE2, NODE3_NO_IB], route=ib_route) == ("10.1.0.11", "subnet")
    # Both shared, the route to the first remote node goes over ib0: ib0.
    assert rv.choose_root(NODE1, [NODE2], route=ib_route) == ("192.168.5.11", "subnet")


def test_peers_on_rank0s_node_do_not_count_as_remote():
    chosen = rv.choose_root(NODE1, [NODE1, NODE3_NO_IB], route=routes({"10.1.0.13": "10.1.0.11"}))
    assert chosen == ("10.1.0.11", "subnet")


def test_routed_networks_fall_back_to_the_kernels_source_address():
    # Nodes on different subnets behind a router: no shared subnet, use the route's source.
    a = node(("eth0", "10.1.0.11", 24))
    b = node(("eth0", "10.2.0.12", 24))
    assert rv.choose_root(a, [b], route=routes({"10.2.0.12": "10.1.0.11"})) == ("10.1.0.11", "route")
    with pytest.raises(rv.RendezvousError, match="MEDFLOW_RDZV_HOST"):
        rv.choose_root(a, [b], route=routes({}))


def test_each_rank_binds_the_interface_that_routes_to_rank0():
    # On rank 0's node: the interface holding the address (the kernel would say lo for it).
    assert rv.interface_towards("192.168.5.11", NODE1, route=routes({"192.168.5.11": "127.0.0.1"})) == "ib0"
    # Elsewhere: the interface whose address the kernel uses for the route.
    assert rv.interface_towards("10.1.0.11", NODE2, route=routes({"10.1.0.11": "10.1.0.12"})) == "eth0"
    assert rv.interface_towards("10.9.9.9", NODE2, route=routes({})) is None


def test_user_interface_and_variables_win():
    named = rv.user_interface({"NCCL_SOCKET_IFNAME": "=ib0"}, NODE1)
    assert named is not None and named[0].address == "192.168.5.11" and named[1] == "NCCL_SOCKET_IFNAME"
    assert rv.user_interface({"NCCL_SOCKET_IFNAME": "^docker,lo"}, NODE1) is None  # NCCL's own syntax
    env = {"NCCL_SOCKET_IFNAME": "ib0"}
    assert rv.bind_interface("eth0", env) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib0"}
    assert rv.bind_interface(None, {}) == {}


def test_local_interfaces_and_routes_of_this_machine():
    ifaces = rv.local_interfaces()
    assert any(i.loopback and i.address == "127.0.0.1" for i in ifaces)
    assert rv.route_source("127.0.0.1") == "127.0.0.1"
    for iface in ifaces:
        socket.inet_aton(iface.address)
        assert 0 <= iface.prefix <= 32
        # The kernel's source address toward an interface's own address is that address (or loopback's).
        assert rv.interface_towards(iface.address, ifaces) == iface.name


@pytest.mark.mpi
def test_agree_under_mpiexec_binds_every_rank():
    script = (
        "import json, os\nfrom mpi4py import MPI\nfrom medflow.train import rendezvous as rv\n"
        "for v in rv.IFNAME_VARS: os.environ.pop(v, None)\n"
        "r = rv.agree(MPI.COMM_WORLD)\n"
        "print(json.dumps([r.address, r.port, r.interface, r.source, os.environ.get('GLOO_SOCKET_IFNAME')]))\n"
    )
    out = subprocess.run(
        [*mpi_launcher(), "-n", "2", str(VENV_BIN / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(rows) == 2 and rows[0] == rows[1]  # same address, port and choice on both ranks
    address, port, iface, source, gloo = json.loads(rows[0])
    assert (address, iface, source, gloo) == ("127.0.0.1", "lo", "local", "lo") and port > 0
