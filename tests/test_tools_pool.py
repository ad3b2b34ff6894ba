"""Tool executors: de-duplication, cache, stats, timeouts and failures in-process; Ray pools that survive
a worker process killed mid-batch, isolate a call that always kills its worker, and time out a hung one."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pydantic import Field

from toolformer_ray.config import ToolConfig
from toolformer_ray.errors import UserError
from toolformer_ray.tools.base import Tool, ToolOptions
from toolformer_ray.tools.executor import LocalToolExecutor, RayToolExecutor


class FlakyOptions(ToolOptions):
    marker_dir: str = ""
    sleep_s: float = Field(30.0, gt=0)


class Flaky(Tool):
    """Test tool (not registered): echoes, and misbehaves on purpose for some inputs.

    "crash-once:<k>"  kills its own worker process the first time (a marker file remembers), then answers
    "poison"          kills its worker process every time
    "raise"           raises (a tool breaking its contract)
    "sleep"           sleeps longer than any timeout
    "none"            no result
    """
    name = "Flaky"
    Options = FlakyOptions
    uses_date = True

    def run(self, inputs, dates=None):
        dates = dates or [None] * len(inputs)
        out = []
        for inp, date in zip(inputs, dates):
            if inp.startswith("crash-once"):
                marker = Path(self.options.marker_dir) / inp.replace(":", "_")
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)  # really kill the worker process, mid-batch
            if inp == "poison":
                os.kill(os.getpid(), signal.SIGKILL)
            if inp == "raise":
                raise RuntimeError("tool bug")
            if inp == "sleep":
                time.sleep(self.options.sleep_s)
            out.append(None if inp == "none" else f"ok:{inp}" + (f"@{date}" if date else ""))
        return out


def flaky_config(tmp_path, **kw) -> ToolConfig:
    options = {"marker_dir": str(tmp_path), **kw.pop("options", {})}
    return ToolConfig(options=options, **kw)


# -- in-process ---------------------------------------------------------------------------------------

def test_local_dedup_cache_order_and_stats(tmp_path):
    ex = LocalToolExecutor({"Flaky": flaky_config(tmp_path, batch_size=3)}, tool_classes={"Flaky": Flaky})
    inputs = ["a", "b", "a", "c", "none", "b", "d"]
    assert ex.submit("Flaky", inputs).get() == ["ok:a", "ok:b", "ok:a", "ok:c", None, "ok:b", "ok:d"]
    assert ex.run("Flaky", ["a", "e"]) == ["ok:a", "ok:e"]
    s = ex.stats()["Flaky"]
    assert (s["calls"], s["distinct"], s["cache_hits"], s["executed"], s["no_result"]) == (9, 6, 3, 6, 1)
    assert s["failures"] == s["timeouts"] == 0


def test_local_dates_are_part_of_the_key_only_for_dated_tools(tmp_path):
    ex = LocalToolExecutor({"Flaky": flaky_config(tmp_path), "Calculator": ToolConfig()},
                           tool_classes={"Flaky": Flaky})
    assert ex.run("Flaky", ["x", "x", "x"], ["2023-01-01", "2023-01-02", "2023-01-01"]) == [
        "ok:x@2023-01-01", "ok:x@2023-01-02", "ok:x@2023-01-01"]
    assert ex.run("Calculator", ["1+1", "1+1"], ["2023-01-01", "2023-01-02"]) == ["2", "2"]
    assert ex.stats()["Calculator"]["distinct"] == 1 and ex.stats()["Flaky"]["distinct"] == 2


def test_local_exception_is_a_failure_of_that_call_only(tmp_path):
    ex = LocalToolExecutor({"Flaky": flaky_config(tmp_path, batch_size=8)}, tool_classes={"Flaky": Flaky})
    assert ex.run("Flaky", ["a", "raise", "b"]) == ["ok:a", None, "ok:b"]
    s = ex.stats()["Flaky"]
    assert s["failures"] == 1 and s["executed"] == 2 and s["retries"] == 3  # the batch re-ran call by call


def test_local_timeout(tmp_path):
    cfg = flaky_config(tmp_path, timeout_s=0.3, batch_size=4, options={"sleep_s": 3.0})
    ex = LocalToolExecutor({"Flaky": cfg}, tool_classes={"Flaky": Flaky})
    assert ex.run("Flaky", ["a", "sleep", "b"]) == ["ok:a", None, "ok:b"]
    s = ex.stats()["Flaky"]
    assert s["timeouts"] == 1 and s["executed"] == 2


def test_local_real_tools_and_errors():
    ex = LocalToolExecutor({"Calculator": ToolConfig(), "Calendar": ToolConfig()})
    assert ex.run("Calculator", ["400 / 1400", "1/0"]) == ["0.29", None]
    assert ex.run("Calendar", [""], ["2023-01-30"]) == ["Today is Monday, January 30, 2023."]
    with pytest.raises(UserError, match="not configured"):
        ex.submit("QA", ["q"])
    with pytest.raises(ValueError):
        ex.submit("Calculator", ["1", "2"], [None])
    with pytest.raises(UserError, match="unknown tool"):
        LocalToolExecutor({"Nope": ToolConfig()})
    with pytest.raises(UserError, match="no search index"):
        LocalToolExecutor({"WikiSearch": ToolConfig(options={"index": "/nonexistent/index"})})
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit("Calculator", ["1"])


# -- Ray ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_pool_matches_local_and_dedups(ray_local):
    cfg = {"Calculator": ToolConfig(workers=2, batch_size=8)}
    inputs = [f"{i} * 3 / 7" for i in range(40)] * 2 + ["1/0", "garbage"]
    with RayToolExecutor(cfg) as ex:
        pending = ex.submit("Calculator", inputs)  # returns at once; the pool works in the background
        assert pending.get(timeout=120) == LocalToolExecutor(cfg).run("Calculator", inputs)
        s = ex.stats()["Calculator"]
        assert (s["calls"], s["distinct"], s["cache_hits"], s["executed"], s["no_result"]) == (82, 42, 40, 42, 2)
        assert s["failures"] == s["timeouts"] == s["worker_restarts"] == 0


@pytest.mark.slow
def test_ray_worker_killed_mid_batch_completes_every_result(ray_local, tmp_path):
    cfg = {"Flaky": flaky_config(tmp_path, workers=2, batch_size=6, max_retries=2)}
    inputs = [f"n{i}" for i in range(10)] + ["crash-once:1"] + [f"m{i}" for i in range(10)] + ["crash-once:2"]
    with RayToolExecutor(cfg, tool_classes={"Flaky": Flaky}) as ex:
        pids_before = set(ex.worker_pids("Flaky"))
        results = ex.submit("Flaky", inputs).get(timeout=180)
        assert results == [f"ok:{x}" for x in inputs]  # every result present, in order
        killed = {int((tmp_path / f"crash-once_{k}").read_text()) for k in (1, 2)}
        assert killed <= pids_before  # the crashes really were worker processes of this pool
        s = ex.stats()["Flaky"]
        assert s["worker_restarts"] >= 1 and s["retries"] >= 1 and s["failures"] == 0
        assert s["executed"] == len(inputs)
        assert not set(ex.worker_pids("Flaky")) & killed  # restarted workers are new processes


@pytest.mark.slow
def test_ray_poison_call_fails_alone_and_hang_times_out(ray_local, tmp_path):
    cfg = {"Flaky": flaky_config(tmp_path, workers=2, batch_size=4, max_retries=1, timeout_s=2.0,
                                 options={"sleep_s": 120.0})}
    inputs = ["a", "poison", "b", "raise", "c", "sleep", "d"]
    with RayToolExecutor(cfg, tool_classes={"Flaky": Flaky}) as ex:
        assert ex.submit("Flaky", inputs).get(timeout=240) == ["ok:a", None, "ok:b", None, "ok:c", None, "ok:d"]
        s = ex.stats()["Flaky"]
        assert s["failures"] == 2  # poison (after max_retries) and raise
        assert s["timeouts"] == 1  # sleep
        assert s["executed"] == 4 and s["worker_restarts"] >= 3
        # The pool still works afterwards, on the replacement workers.
        assert ex.run("Flaky", ["e"]) == ["ok:e"]


@pytest.mark.slow
def test_ray_pool_start_errors_are_user_errors(ray_local):
    with pytest.raises(UserError, match="no search index"):
        RayToolExecutor({"WikiSearch": ToolConfig(options={"index": "/nonexistent/index"})})
    with pytest.raises(UserError, match="did not start"):
        RayToolExecutor({"Calculator": ToolConfig(worker_cpus=64)}, start_timeout_s=3)


class Fragile(Flaky):
    """Loads only while no "broken" marker exists: a worker that dies after that cannot be replaced."""
    name = "Fragile"

    def load(self):
        if (Path(self.options.marker_dir) / "broken").exists():
            raise UserError("resource gone")


@pytest.mark.slow
def test_ray_pool_that_cannot_restart_fails_calls_instead_of_hanging(ray_local, tmp_path):
    cfg = {"Fragile": flaky_config(tmp_path, workers=1, max_retries=1)}
    with RayToolExecutor(cfg, tool_classes={"Fragile": Fragile}) as ex:
        assert ex.run("Fragile", ["a"]) == ["ok:a"]
        (tmp_path / "broken").write_text("")
        assert ex.submit("Fragile", ["poison", "b"]).get(timeout=120) == [None, None]
        assert "resource gone" in ex.pool_errors()["Fragile"]
        assert ex.run("Fragile", ["c"]) == [None]  # a broken pool answers at once
        s = ex.stats()["Fragile"]
        assert s["failures"] == 3 and s["executed"] == 1 and s["worker_restarts"] >= 3
