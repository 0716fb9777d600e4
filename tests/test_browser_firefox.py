"""End to end with a second browser: headless Firefox ESR calls the echo transceiver through the relay.

The same scenario as the Chromium test (tests/browser_scenario.py: ``rtcrelay up``, the demo
page, ``window.__call()``, the checks of :func:`check_call`, hang-up, the flow gone, Ctrl-C),
with Debian's ``firefox-esr`` driven over WebDriver BiDi (tests/bidi.py), in a network
namespace that has only ``lo``. Firefox needs a few prefs to call over the loopback with a
fake microphone (``bidi.FIREFOX_PREFS``; docs/BROWSERS.md says why each one).

On top of the shared checks: Firefox offered a 127.0.0.1 host candidate (what the microphone
permission is for: without it the offer has no candidate here), and the call was set up with
Firefox's own media stack (Opus, DTLS-SRTP with AEAD-AES-GCM).

A missing Firefox is a failure, not a skip: ``scripts/test`` installs it (scripts/browser-deps.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from browser_scenario import CallScenario, call_figures, check_call, require_browser, run_scenario, scenario_main


@pytest.mark.browser
def test_firefox_call(tmp_path: Path) -> None:
    from bidi import find_firefox

    firefox = require_browser(find_firefox(), "Firefox", "RTCRELAY_FIREFOX", "/usr/lib/firefox-esr/firefox-esr",
                              "firefox-esr")
    report, details, _ = run_scenario(__file__, tmp_path, "--firefox", firefox)
    check_call(report, details)
    assert report["browser"]["version"].startswith("firefox "), details
    offered = {line.split()[4] for line in report["offer_candidates"] if " UDP " in line.upper()}
    assert "127.0.0.1" in offered, f"Firefox offered no loopback candidate: {report['offer_candidates']}\n{details}"
    page = report["page"]
    assert page["codec"].startswith("audio/opus 48000"), details
    assert page["srtpCipher"] and "AES" in page["srtpCipher"], details
    print("\nFIGURES browser_call firefox: " + json.dumps(call_figures(report)))


# ---------------------------------------------------------------------------------------
# the scenario (this file run as a script, inside the namespace)
# ---------------------------------------------------------------------------------------


class FirefoxScenario(CallScenario):
    def __init__(self, out: Path, firefox: str) -> None:
        super().__init__(out)
        self.firefox = firefox

    async def launch_browser(self) -> None:
        from bidi import Firefox

        self.browser = await Firefox.launch(self.out / "browser", executable=self.firefox)
        self.record_pid("firefox", self.browser.proc.pid)
        self.report["browser"] = {"version": self.browser.version, "args": self.browser.args[1:]}

    async def open_page(self, url: str) -> None:
        self.page = await self.browser.new_tab(url)


def main() -> int:
    parser = argparse.ArgumentParser(description="the Firefox call scenario (run by test_browser_firefox)")
    parser.add_argument("--firefox", required=True)
    return scenario_main(parser, lambda args: FirefoxScenario(args.out, args.firefox))


if __name__ == "__main__":
    sys.exit(main())
