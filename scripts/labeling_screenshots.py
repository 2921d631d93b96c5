"""Screenshots of the labeling app for the README (``docs/labeling-*.png``), in Debian's headless Chromium.

    .venv/bin/python scripts/labeling_screenshots.py [--policy runs/tiny/checkpoints/policy]

Serves the demo's policy (after ``make demo``) and a feedback service with the labeling page on loopback,
asks the policy for a comparison task, then signs in as a labeler and captures the Compare tab (ratings,
a flag, a tie) and the Chat tab after one turn with the live policy. Needs ``chromium`` and
``chromium-driver`` (apt) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from chatrl.clients.lib import FeedbackClient
from chatrl.services.feedback.server import FeedbackConfig
from chatrl.services.feedback.server import build as build_feedback
from chatrl.services.policy.server import PolicyConfig
from chatrl.services.policy.server import build as build_policy
from chatrl.services.runtime.server import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=str(ROOT / "runs/tiny/checkpoints/policy"))
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="chatrl-shots-"))
    psrv, psvc = build_policy(ServerConfig(port=0, auth_token_env="", labeler_token_env=""),
                              PolicyConfig(checkpoint=args.policy, max_new_tokens=40, threads=1))
    srv, svc = build_feedback(ServerConfig(port=0, auth_token_env="", labeler_token_env=""),
                              FeedbackConfig(db=str(tmp / "feedback.db"), policy_address=psrv.address, web_port=0,
                                             web_chat_max_new_tokens=40, web_alternatives_k=3))
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,900", "--no-first-run",
                 "--disable-background-networking", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    wait = WebDriverWait(drv, 120)
    try:
        with FeedbackClient(srv.address) as fb:
            fb.create_comparison_tasks(["What did you think of the movie?"], 3, max_new_tokens=40, seed=7)
        drv.get(svc.web.url)
        drv.find_element(By.ID, "labeler").send_keys("alice")
        drv.find_element(By.ID, "labeler").send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "me").text.startswith("alice"))
        drv.find_element(By.ID, "next").click()
        wait.until(lambda d: d.switch_to.active_element.get_attribute("data-index") == "0")
        for k in ("6", "j", "3", "u", Keys.ARROW_UP, "t", "j", "j", "5"):  # rate, flag, move, tie
            drv.switch_to.active_element.send_keys(k)
        drv.save_screenshot(str(out / "labeling-compare.png"))
        drv.find_element(By.ID, "tab-chat").click()
        box = wait.until(lambda d: d.find_element(By.ID, "chat-input"))
        box.send_keys("Tell me about the story.")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .turn.assistant")) == 1)
        time.sleep(2)  # the streamed reply finishes
        drv.save_screenshot(str(out / "labeling-chat.png"))
    finally:
        drv.quit()
        srv.stop(0)
        svc.close()
        psrv.stop(0)
        psvc.close()
    print(f"wrote {out / 'labeling-compare.png'} and {out / 'labeling-chat.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
