"""End to end, issue 13 ("nothing lost, nothing stuck"): the real daemon against bad files, answers that
break mid-body, a full disk and SIGKILL at random points; each asserts what a user would see."""

from __future__ import annotations

from conftest import wait_for
from harness import manifest

DEEP_TOML = 'service_name = "deep"\nx = ' + "[" * 3000 + "]" * 3000 + "\n"


def test_a_bad_manifest_at_start_is_refused_and_the_watch_goes_on(backends, edged) -> None:
    # Before: RecursionError at start made `edged run` exit 1 (a restart loop under systemd); dropped in later,
    # it ended the manifest watch, so later files were ignored until SIGHUP.
    b = backends("a")
    d = edged({"deep.toml": DEEP_TOML, "good.toml": manifest("good", [(b.port, 1)])})
    assert d.call("good", "/x")[0] == 200
    assert "deep.toml: nested too deeply" in d.log_text()
    d.write_manifest("deep2.toml", DEEP_TOML.replace('"deep"', '"deep2"'))
    wait_for(lambda: "deep2.toml: nested too deeply" in d.log_text(), 10, what="the second deep file refused")
    d.write_manifest("later.toml", manifest("later", [(b.port, 1)]))
    wait_for(lambda: d.call("later", "/x")[0] == 200, 10, what="a later good manifest served")
    status = d.get("/v1/status")
    assert status["config"]["tasks_failed"] == {}
    assert d.stop() == 0
