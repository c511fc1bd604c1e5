"""The API client and Node discovery against the API server double (real HTTP, real wire format)."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from tests.k8s.apiserver import ApiServer
from weaved.core.kube.nodes import NodeChanges, NodeView
from weaved.k8s.client import Conflict, Gone, KubeClient, KubeConfig, KubeError, NotFound
from weaved.k8s.discovery import Backoff, follow_nodes

pytestmark = pytest.mark.anyio


async def test_list_nodes_gives_items_and_version(api: ApiServer, client: KubeClient) -> None:
    api.add_node("n1", "198.51.100.1")
    api.add_node("n2", None, "203.0.113.2")
    items, version = await client.list_nodes()
    assert [i["metadata"]["name"] for i in items] == ["n1", "n2"]
    assert version == str(api.version)


async def test_a_wrong_token_is_a_readable_401(api: ApiServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("nope")
    async with KubeClient(KubeConfig(api.url, bad)) as kube:
        with pytest.raises(KubeError, match=r"^HTTP 401: Unauthorized$") as info:
            await kube.list_nodes()
    assert info.value.status == 401


async def test_a_missing_token_file_is_named(api: ApiServer, tmp_path: Path) -> None:
    async with KubeClient(KubeConfig(api.url, tmp_path / "absent")) as kube:
        with pytest.raises(KubeError, match=r"cannot read the service account token .*absent"):
            await kube.list_nodes()


async def test_watch_streams_events_after_the_version(api: ApiServer, client: KubeClient) -> None:
    api.add_node("n1", "198.51.100.1")
    _, version = await client.list_nodes()
    api.add_node("n2", "198.51.100.2")
    api.delete_node("n1")
    seen = []
    async for kind, obj in client.watch_nodes(version, timeout_seconds=1):
        seen.append((kind, obj["metadata"]["name"]))
    assert seen == [("ADDED", "n2"), ("DELETED", "n1")]


async def test_watch_from_a_compacted_version_raises_gone(api: ApiServer, client: KubeClient) -> None:
    api.add_node("n1", "198.51.100.1")
    _, version = await client.list_nodes()
    api.add_node("n2", "198.51.100.2")
    api.compact()
    with pytest.raises(Gone, match="too old resource version"):
        async for _ in client.watch_nodes(version, timeout_seconds=1):
            pass


async def test_configmap_replace_is_conditional(api: ApiServer, client: KubeClient) -> None:
    api.create_configmap("kube-system", "weaved")
    data, version = await client.get_configmap("kube-system", "weaved")
    assert data == {}
    newer = await client.replace_configmap("kube-system", "weaved", {"n1": "aa"}, version)
    assert int(newer) > int(version)
    with pytest.raises(Conflict, match="the object has been modified"):
        await client.replace_configmap("kube-system", "weaved", {"n1": "bb"}, version)
    assert api.configmap_data("kube-system", "weaved") == {"n1": "aa"}
    with pytest.raises(NotFound):
        await client.get_configmap("kube-system", "other")


async def test_unreachable_server_is_a_kube_error(token_file: Path) -> None:
    async with KubeClient(KubeConfig("http://127.0.0.1:9", token_file)) as kube:
        with pytest.raises(KubeError, match="GET /api/v1/nodes: Client"):
            await kube.list_nodes()


def test_in_cluster_config_reads_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    config = KubeConfig.in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                                   tmp_path)
    assert config == KubeConfig("https://10.96.0.1:443", tmp_path / "token", tmp_path / "ca.crt")
    assert KubeConfig.in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1"}, tmp_path).server == "https://[fd00::1]:443"
    with pytest.raises(KubeError, match="not in a cluster"):
        KubeConfig.in_cluster({}, tmp_path)


# --- discovery: list, watch, and survive what the API server does ------------------------------------


class Recorder:
    def __init__(self, view: NodeView) -> None:
        self.view = view
        self.changes: list[tuple[NodeChanges, bool]] = []
        self.changed = anyio.Event()

    async def __call__(self, changes: NodeChanges, relisted: bool) -> None:
        self.changes.append((changes, relisted))
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: object, timeout: float = 5.0) -> None:
        assert callable(predicate)
        with anyio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()


async def no_sleep(_: float) -> None:
    await anyio.sleep(0.01)


async def start_follow(tg: anyio.abc.TaskGroup, client: KubeClient, rec: Recorder, **kwargs: object) -> None:
    tg.start_soon(lambda: follow_nodes(client, rec.view, rec, rng=random.Random(1), sleep=no_sleep,
                                       watch_timeout=kwargs.get("watch_timeout", 30)))  # type: ignore[arg-type]


async def test_discovery_follows_adds_address_changes_and_deletes(api: ApiServer, client: KubeClient) -> None:
    api.add_node("me", "198.51.100.1")
    api.add_node("n2", "198.51.100.2")
    rec = Recorder(NodeView("me"))
    async with anyio.create_task_group() as tg:
        await start_follow(tg, client, rec)
        await rec.until(lambda: rec.view.peers() == {"198.51.100.2"})
        assert rec.changes[0] == (NodeChanges(added={"198.51.100.2"}), True), "own node is never a peer"
        api.add_node("n3")  # no address yet
        api.add_node("n3", "198.51.100.3")  # MODIFIED: now it has one
        await rec.until(lambda: "198.51.100.3" in rec.view.peers())
        api.delete_node("n2")
        await rec.until(lambda: any(c.deleted == {"n2"} for c, _ in rec.changes))
        assert rec.view.peers() == {"198.51.100.3"}
        assert rec.changes[-1] == (NodeChanges(removed={"198.51.100.2"}, deleted={"n2"}), False)
        tg.cancel_scope.cancel()


async def test_discovery_survives_errors_and_dropped_streams(api: ApiServer, client: KubeClient) -> None:
    api.add_node("me", "198.51.100.1")
    api.fail_next("list", 500, 503)  # the first list attempts fail: backoff, then succeed
    rec = Recorder(NodeView("me"))
    async with anyio.create_task_group() as tg:
        await start_follow(tg, client, rec)
        await rec.until(lambda: len(rec.changes) == 1)
        assert api.requests["list"] == 3
        for round_ in range(3):  # Weave Net's watcher stopped after the first error (#3910)
            api.fail_next("watch", 500, 403)
            api.drop_watches()
            await anyio.sleep(0.05)
            api.add_node(f"n{round_}", f"198.51.100.{10 + round_}")
            await rec.until(lambda r=round_: f"198.51.100.{10 + r}" in rec.view.peers())
        assert api.requests["list"] == 3, "a known version is resumed, not relisted"
        assert api.requests["watch"] >= 7
        tg.cancel_scope.cancel()


async def test_gone_relists_and_finds_deletions_it_missed(api: ApiServer, client: KubeClient) -> None:
    api.add_node("me", "198.51.100.1")
    api.add_node("n2", "198.51.100.2")
    rec = Recorder(NodeView("me"))
    async with anyio.create_task_group() as tg:
        await start_follow(tg, client, rec)
        await rec.until(lambda: len(rec.changes) == 1)
        api.delete_node_silently("n2")  # the watch never hears of it...
        api.compact()  # ...and its version is gone
        api.drop_watches()
        await rec.until(lambda: len(rec.changes) == 2)
        assert rec.changes[1] == (NodeChanges(removed={"198.51.100.2"}, deleted={"n2"}), True)
        assert api.requests["list"] == 2
        tg.cancel_scope.cancel()


async def test_bookmarks_keep_the_version_fresh(api: ApiServer, client: KubeClient) -> None:
    """A quiet cluster: without bookmarks the resumed watch would start from a compacted version."""
    api.add_node("me", "198.51.100.1")
    rec = Recorder(NodeView("me"))
    async with anyio.create_task_group() as tg:
        await start_follow(tg, client, rec)
        await rec.until(lambda: len(rec.changes) == 1)
        with anyio.fail_after(5):
            while not api.watchers:
                await anyio.sleep(0.01)
        api.bookmark()
        await anyio.sleep(0.1)
        api.compact()  # everything before the bookmark's version is gone
        api.drop_watches()
        api.add_node("n2", "198.51.100.2")
        await rec.until(lambda: "198.51.100.2" in rec.view.peers())
        assert api.requests["list"] == 1, "resumed from the bookmark, no relist"
        tg.cancel_scope.cancel()


async def test_a_watch_timeout_resumes_without_relisting(api: ApiServer, client: KubeClient) -> None:
    api.add_node("me", "198.51.100.1")
    rec = Recorder(NodeView("me"))
    async with anyio.create_task_group() as tg:
        await start_follow(tg, client, rec, watch_timeout=1)
        await rec.until(lambda: len(rec.changes) == 1)
        await anyio.sleep(1.3)
        api.add_node("n2", "198.51.100.2")
        await rec.until(lambda: "198.51.100.2" in rec.view.peers())
        assert api.requests["list"] == 1 and api.requests["watch"] >= 2
        tg.cancel_scope.cancel()


def test_backoff_grows_caps_and_resets() -> None:
    backoff = Backoff(random.Random(0), low=1.0, high=8.0)
    delays = [backoff.next() for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.75 <= delay <= base * 1.25
    backoff.reset()
    assert backoff.next() <= 1.25
