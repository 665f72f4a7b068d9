"""The devices of an HCCL rank table that this server starts (scripts/run_distribute_train.sh, Ascend).

A rank table lists every server of the job (`server_list`, each with its `server_id`, the host address,
and its `device`s with `device_id` and global `rank_id`). The launch script runs on each server; the server
is the entry SERVER_ID names (its index in server_list, or its server_id), else the one whose server_id is
an address of this host.

    python -m src.rank_table RANK_TABLE_FILE      # prints RANK_SIZE, then "rank_id device_id" per line
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Iterable, List, Optional, Sequence, Set, Tuple


class RankTableError(ValueError):
    """The rank table is malformed or names no device of this server."""


def load(path: str) -> List[dict]:
    """The server_list of a rank table, each server checked for server_id and its devices."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            servers = json.load(handle)["server_list"]
        for server in servers:
            str(server["server_id"])
            for device in server["device"]:
                int(device["rank_id"]), int(device["device_id"])
    except OSError as err:
        raise RankTableError(f"cannot read rank table '{path}': {err.strerror}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise RankTableError(f"{path} is not an HCCL rank table (server_list/server_id/device/rank_id/"
                             f"device_id): {err!r}") from None
    if not servers:
        raise RankTableError(f"{path}: server_list is empty")
    return servers


def host_addresses() -> Set[str]:
    """Addresses of this host: its name, `hostname -I`, and what the name resolves to."""
    addresses = {socket.gethostname(), socket.getfqdn()}
    try:
        addresses.update(subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False,
                                        timeout=10).stdout.split())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        addresses.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return addresses


def this_server(servers: Sequence[dict], path: str, server_id: Optional[str] = None,
                addresses: Iterable[str] = ()) -> dict:
    """The entry of server_list this host starts: SERVER_ID (index or server_id), else a host address."""
    ids = [str(server["server_id"]) for server in servers]
    if server_id:
        if server_id in ids:
            return servers[ids.index(server_id)]
        if server_id.isdigit() and int(server_id) < len(servers):
            return servers[int(server_id)]
        raise RankTableError(f"{path}: SERVER_ID '{server_id}' is neither a server_id ({', '.join(ids)}) "
                             f"nor an index below {len(servers)}")
    if len(servers) == 1:
        return servers[0]
    mine = [server for server in servers if str(server["server_id"]) in set(addresses)]
    if len(mine) != 1:
        raise RankTableError(f"{path}: {len(servers)} servers ({', '.join(ids)}) and "
                             f"{'none' if not mine else 'several'} of them is this host; "
                             f"set SERVER_ID to this server's server_id or index")
    return mine[0]


def local_ranks(path: str, server_id: Optional[str] = None,
                addresses: Optional[Iterable[str]] = None) -> Tuple[int, List[Tuple[int, int]]]:
    """(RANK_SIZE of the whole job, [(rank_id, device_id)] of this server's devices)."""
    servers = load(path)
    if server_id is None and len(servers) > 1 and addresses is None:
        addresses = host_addresses()
    server = this_server(servers, path, server_id, addresses or ())
    rank_size = sum(len(s["device"]) for s in servers)
    return rank_size, [(int(d["rank_id"]), int(d["device_id"])) for d in server["device"]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="This server's devices of an HCCL rank table "
                                                 "(SERVER_ID from the environment chooses the server).")
    parser.add_argument("rank_table", help="HCCL rank table JSON")
    args = parser.parse_args(argv)
    try:
        rank_size, ranks = local_ranks(args.rank_table, os.getenv("SERVER_ID") or None)
    except RankTableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(rank_size)
    for rank, device in ranks:
        print(rank, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
