"""Open a page in headless Chromium (Debian's `chromium`): the DOM after its scripts ran, console errors, a
screenshot. A test aid: `python -m tests.browser index.html shot.png` prints what it found.

Console errors: Chromium logs every console message and uncaught exception to stderr at one level
(`--enable-logging=stderr`), so a copy of the page is opened with a first script that prefixes
`console.error` messages; uncaught exceptions ("Uncaught ...") and failed loads ("Failed to load resource",
`net::ERR_`) are recognised by their text. The page itself is not changed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ERROR_MARK = "PAGE-CONSOLE-ERROR:"
_PROBE = ("<script>(()=>{const e=console.error.bind(console);"
          f"console.error=(...a)=>e('{ERROR_MARK}',...a);}})();</script>")
_CONSOLE = re.compile(r'CONSOLE[^\]]*\]\s+"(.*)", source: (.*)$')


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Rendered:
    dom: str
    console: list[str]
    errors: list[str]
    screenshot: Path | None


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-extensions", "--virtual-time-budget=15000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout_s, check=False)


def render(page: Path, screenshot: Path | None = None, window: str = "1400,3000",
           timeout_s: float = 180) -> Rendered:
    page = Path(page).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / page.name
        text = page.read_text(encoding="utf-8")
        probed.write_text(text.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
        res = _run(["--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()], timeout_s)
    console = [m.group(1) for line in res.stderr.splitlines() if (m := _CONSOLE.search(line))]
    errors = [c for c in console if c.startswith(ERROR_MARK) or c.startswith("Uncaught")
              or "Failed to load resource" in c or "net::ERR_" in c]
    shot = None
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        _run([f"--window-size={window}", f"--screenshot={screenshot}", page.as_uri()], timeout_s)
        shot = screenshot if screenshot.is_file() else None
    return Rendered(res.stdout, console, errors, shot)


def count_datatables(dom: str) -> int:
    """Tables DataTables has initialised (it wraps each in a div.dt-container)."""
    return len(re.findall(r'class="dt-container', dom))


def main(argv: list[str]) -> int:
    page, shot = Path(argv[0]), Path(argv[1]) if len(argv) > 1 else None
    r = render(page, shot)
    print(f"DataTables rendered: {count_datatables(r.dom)}; images: "
          f"{r.dom.count('<img')}; console messages: {len(r.console)}; errors: {r.errors or 'none'}; "
          f"screenshot: {r.screenshot}")
    return 1 if r.errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
