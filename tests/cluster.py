"""A local Redis Cluster for the tests: masters (each with a replica) on spare loopback
ports, created with redis-cli, stopped and removed afterwards."""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from tests.services import redis_binary


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` ports whose cluster bus ports (the port + 10000) are free too."""
    ports = []
    candidate = random.randrange(20000, 29000)
    while len(ports) < n:
        candidate += 1
        if _free(candidate) and _free(candidate + 10000):
            ports.append(candidate)
    return ports


class LocalCluster:
    def __init__(self, masters: int = 3, replicas: int = 1):
        self.dir = tempfile.mkdtemp(prefix="crm-cluster-")
        self.ports = free_ports(masters * (1 + replicas))
        self.replicas = replicas
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _start_node(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "1000",
             # Each node its own snapshot file: replicas sync through it, and nodes sharing
             # one folder would overwrite each other's (a replica out of sync never fails over).
             "--dbfilename", f"dump-{port}.rdb", "--cluster-replica-validity-factor", "0",
             # Replicas sync at once (the default waits 5 s to batch them).
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> "LocalCluster":
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait(lambda: redis.Redis(host="127.0.0.1", port=port).ping())
        subprocess.run([redis_binary("redis-cli"), "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        self.wait_ok()
        for port in self.ports:
            self.wait_replicated(port)
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        def ok():
            for port, proc in self.procs.items():
                if proc.poll() is None:
                    info = redis.Redis(host="127.0.0.1", port=port).execute_command("CLUSTER INFO")
                    state = info.get("cluster_state") if isinstance(info, dict) else None
                    if state not in ("ok", b"ok"):
                        return False
            return True
        self._wait(ok, timeout)

    @staticmethod
    def _wait(check, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not come up")
            time.sleep(0.1)

    def wait_replicated(self, port: int, timeout: float = 30) -> None:
        """Until every replica of the master on ``port`` holds all its writes (replication
        is asynchronous: a master killed before would take the last writes with it)."""
        def caught_up():
            info = redis.Redis(host="127.0.0.1", port=port).info("replication")
            if info["role"] != "master":
                return True
            offsets = [info[f"slave{n}"]["offset"] for n in range(info["connected_slaves"])]
            return len(offsets) == self.replicas and all(o >= info["master_repl_offset"] for o in offsets)
        self._wait(caught_up, timeout)

    def master_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot."""
        r = redis.Redis(host="127.0.0.1", port=self.ports[0])
        slot = r.execute_command("CLUSTER KEYSLOT", key)
        for start, end, master, *_ in r.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise KeyError(key)

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
