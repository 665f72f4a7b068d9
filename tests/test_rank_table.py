"""Which devices of a multi-server HCCL rank table this server starts."""
import json

import pytest

from src.rank_table import RankTableError, local_ranks


@pytest.fixture
def table(tmp_path):
    servers = [{"server_id": f"10.255.0.{s + 1}", "host_nic_ip": "reserve",
                "device": [{"device_id": str(d), "device_ip": f"192.98.9{s}.{d}", "rank_id": str(4 * s + d)}
                           for d in range(4)]} for s in range(2)]
    path = tmp_path / "hccl_2s_8p.json"
    path.write_text(json.dumps({"version": "1.0", "server_count": "2", "server_list": servers}))
    return str(path)


def test_the_server_is_found_by_a_host_address(table):
    assert local_ranks(table, addresses={"myhost", "10.255.0.2"}) == (8, [(4, 0), (5, 1), (6, 2), (7, 3)])
    assert local_ranks(table, addresses={"10.255.0.1"}) == (8, [(0, 0), (1, 1), (2, 2), (3, 3)])


@pytest.mark.parametrize("server_id", ["10.255.0.2", "1"])
def test_server_id_names_the_server_by_id_or_index(table, server_id):
    assert local_ranks(table, server_id, addresses={"10.255.0.1"})[1][0] == (4, 0)


@pytest.mark.parametrize("server_id, addresses, message", [
    (None, {"192.0.2.7"}, "none of them is this host; set SERVER_ID"),
    ("2", (), "SERVER_ID '2' is neither a server_id (10.255.0.1, 10.255.0.2) nor an index below 2"),
])
def test_an_unknown_server_is_a_clear_error(table, server_id, addresses, message):
    with pytest.raises(RankTableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        local_ranks(table, server_id, addresses)


def test_a_one_server_table_needs_no_address(tmp_path):
    path = tmp_path / "hccl_1p.json"
    path.write_text(json.dumps({"server_list": [{"server_id": "10.0.0.9", "device": [
        {"device_id": "3", "rank_id": "0"}]}]}))
    assert local_ranks(str(path), addresses=()) == (1, [(0, 3)])
