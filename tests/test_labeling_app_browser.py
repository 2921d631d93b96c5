"""The labeling app in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by
selenium): a keyboard-only comparison with ratings, flags and a tie; a two-turn written demonstration; a
chat of two turns whose alternatives become a task with the conversation as its prompt; a wrong
credential refused. Each asserts on what the store holds. ``.ci/run`` installs the browser
(``apt-get install -y chromium chromium-driver``); without it these tests skip, saying so."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from kit import env_var, tiny_checkpoint

from chatrl.clients.lib import FeedbackClient
from chatrl.services.feedback.server import FeedbackConfig, build
from chatrl.services.policy.server import PolicyConfig
from chatrl.services.policy.server import build as build_policy
from chatrl.services.runtime.server import ServerConfig

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if not (CHROMIUM and DRIVER):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN, TOKEN_ENV = "browser-operator-token", "CHATRL_BROWSER_TEST_TOKEN"
LABELER_TOKEN = "browser-labeler-token"  # a team's shared credential: the labeler types their id
PAT_TOKEN = "browser-pat-own-token"  # pat's own credential: it names pat
WAIT_S = 120  # a shared 2-core machine: the browser and the tiny model can both be slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A policy server over a tiny GPT and a feedback server with the app, on loopback."""
    tmp = tmp_path_factory.mktemp("labeling-app")
    psrv, psvc = build_policy(ServerConfig(port=0, auth_token_env=""),
                              PolicyConfig(checkpoint=str(tiny_checkpoint(tmp / "ckpt")), max_new_tokens=16))
    (tmp / "labelers").mkdir()
    (tmp / "labelers" / "pat").write_text(PAT_TOKEN)
    with env_var(TOKEN_ENV, TOKEN), env_var("CHATRL_LABELER_TOKEN", LABELER_TOKEN):
        srv, svc = build(ServerConfig(port=0, auth_token_env=TOKEN_ENV, grace_seconds=1,
                                      labelers_dir=str(tmp / "labelers")),
                         FeedbackConfig(db=str(tmp / "feedback.db"), policy_address=psrv.address, web_port=0,
                                        web_chat_max_new_tokens=6, web_alternatives_k=3))
    yield SimpleNamespace(url=svc.web.url, store=svc.store, address=srv.address)
    srv.stop(0)
    svc.close()
    psrv.stop(0)
    psvc.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


def _wait(drv, cond, what: str):
    try:
        return WebDriverWait(drv, WAIT_S).until(lambda d: cond(d))
    except Exception as e:  # say what the page said
        raise AssertionError(f"waiting for {what}; the page says {drv.find_element(By.ID, 'msg').text!r}") from e


def _sign_in(drv, url: str, labeler: str, token: str = LABELER_TOKEN) -> None:
    drv.get(url)
    for field, value in (("labeler", labeler), ("token", token)):  # the page remembers the last sign-in
        drv.find_element(By.ID, field).clear()
        drv.find_element(By.ID, field).send_keys(value)
    _press(drv, Keys.ENTER)  # submits the sign-in form


def _signed_in(drv, labeler: str) -> None:
    _wait(drv, lambda d: d.find_element(By.ID, "me").text.startswith(labeler), "the signed-in labeler's stats")


def _press(drv, *keys) -> None:
    """Keys to whatever has the focus, one at a time (what a person at the keyboard does)."""
    for k in keys:
        drv.switch_to.active_element.send_keys(k)


def test_a_wrong_credential_is_refused(app, browser):
    _sign_in(browser, app.url, "mallory", token="not-the-token")
    _wait(browser, lambda d: "credential" in d.find_element(By.ID, "msg").text.lower(), "the refusal")
    assert not browser.find_element(By.ID, "tabs").is_displayed()


def test_a_personal_credential_signs_in_without_typing_an_id(app, browser):
    _sign_in(browser, app.url, "", token=PAT_TOKEN)
    _signed_in(browser, "pat")
    assert browser.find_element(By.ID, "labeler").get_attribute("value") == "pat"
    _sign_in(browser, app.url, "kb-alice", token=PAT_TOKEN)  # pat cannot label as someone else
    _wait(browser, lambda d: "is not the labeler of the credential" in d.find_element(By.ID, "msg").text,
          "the refusal")


def test_keyboard_only_compare_with_ratings_flags_and_a_tie(app, browser):
    (tid,) = app.store.create_tasks([{"prompt": "Say something kind.", "responses": ["alpha", "beta", "gamma"]}])
    _sign_in(browser, app.url, "kb-alice")
    _signed_in(browser, "kb-alice")
    browser.find_element(By.ID, "next").send_keys(Keys.ENTER)
    _wait(browser, lambda d: d.switch_to.active_element.get_attribute("data-index") == "0", "the first response")
    # alpha 5/7; beta 7/7 moved to the top, tied with alpha; gamma 2/7 flagged (i)nstruction, (u)nfinished
    _press(browser, "5", "j", "7", Keys.ARROW_UP, "t", "j", "j", "2", "i", "u")
    _press(browser, Keys.CONTROL + Keys.ENTER)
    _wait(browser, lambda d: "Saved (2 preference pairs" in d.find_element(By.ID, "msg").text, "the saved message")
    (row,) = [r for r in app.store.export("rankings") if r["task_id"] == tid]
    assert row["labeler_id"] == "kb-alice"
    assert row["ranking"] == [1, 0, 2] and row["tied_with_next"] == [True, False]
    assert row["ratings"] == [5, 7, 2]
    assert row["flags"] == [[], [], ["fails_instruction", "unfinished"]]


def test_rank_by_dragging_with_the_mouse(app, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    (tid,) = app.store.create_tasks([{"prompt": "Name a colour.", "responses": ["red", "green", "blue"]}])
    _sign_in(browser, app.url, "drag-carol")
    _signed_in(browser, "drag-carol")
    browser.find_element(By.ID, "next").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li.resp")) == 3, "the responses")
    order = lambda d: [li.get_attribute("data-index") for li in d.find_elements(By.CSS_SELECTOR, "#list li.resp")]  # noqa: E731
    # a real pointer drag (the browser's own HTML5 drag and drop): press on "blue", move over the upper half
    # of "red" in small steps, release
    blue, red = (browser.find_element(By.CSS_SELECTOR, f'#list li.resp[data-index="{i}"] .txt') for i in (2, 0))
    ActionChains(browser).click_and_hold(blue).move_by_offset(0, -8).move_to_element_with_offset(red, 0, -6) \
        .move_by_offset(0, -2).release().perform()
    _wait(browser, lambda d: order(d) == ["2", "0", "1"], "blue dragged to the top")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: "Saved (3 preference pairs" in d.find_element(By.ID, "msg").text, "the saved message")
    (row,) = [r for r in app.store.export("rankings") if r["task_id"] == tid]
    assert row["labeler_id"] == "drag-carol" and row["ranking"] == [2, 0, 1]


def test_a_two_turn_written_demonstration_is_exported(app, browser):
    _sign_in(browser, app.url, "writer-bob")
    _signed_in(browser, "writer-bob")
    browser.find_element(By.ID, "tab-write").send_keys(Keys.ENTER)
    first_user, first_reply = browser.find_elements(By.CSS_SELECTOR, "#turns .turn-content")
    first_user.send_keys("What is a haiku?")
    first_reply.send_keys("A three-line poem of five, seven and five syllables.")
    browser.find_element(By.ID, "add-user").send_keys(Keys.ENTER)
    _press(browser, "Write one about rain.")  # the new turn has the focus
    browser.find_element(By.ID, "add-assistant").send_keys(Keys.ENTER)
    _press(browser, "Soft rain on the roof")
    browser.find_element(By.ID, "submit-demo").send_keys(Keys.ENTER)
    _wait(browser, lambda d: "Demonstration saved" in d.find_element(By.ID, "msg").text, "the saved message")
    with FeedbackClient(app.address, token=TOKEN) as c:  # the chat-messages JSONL the next SFT reads
        (line,) = [json.loads(ln) for ln in c.export("demonstrations") if '"writer-bob"' in ln]
    assert line["messages"] == [
        {"role": "user", "content": "What is a haiku?"},
        {"role": "assistant", "content": "A three-line poem of five, seven and five syllables."},
        {"role": "user", "content": "Write one about rain."},
        {"role": "assistant", "content": "Soft rain on the roof"}]


def _assistant_turns(drv) -> list:
    return drv.find_elements(By.CSS_SELECTOR, "#chat-log .turn.assistant .alternatives")


def test_chat_two_turns_then_compare_makes_the_conversation_the_prompt(app, browser):
    _sign_in(browser, app.url, "chat-carol")
    _signed_in(browser, "chat-carol")
    browser.find_element(By.ID, "tab-chat").send_keys(Keys.ENTER)
    for n, text in enumerate(["hello there", "tell me more"], 1):
        browser.find_element(By.ID, "chat-input").send_keys(text, Keys.ENTER)
        _wait(browser, lambda d, n=n: len(_assistant_turns(d)) == n, f"streamed reply {n}")
    replies = [el.get_attribute("textContent") for el in browser.find_elements(By.CSS_SELECTOR, "#chat-log .turn.assistant .content")]
    _assistant_turns(browser)[1].send_keys(Keys.ENTER)  # alternatives to the second reply
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li.resp")) == 3, "the 3 replies to rank")
    _press(browser, Keys.ARROW_DOWN, Keys.CONTROL + Keys.ENTER)  # the shown reply goes second
    _wait(browser, lambda d: d.find_element(By.ID, "view-chat").is_displayed(), "the return to the chat")
    (row,) = [r for r in app.store.export("rankings") if r["labeler_id"] == "chat-carol"]
    assert row["messages"] == [{"role": "user", "content": "hello there"},
                               {"role": "assistant", "content": replies[0]},
                               {"role": "user", "content": "tell me more"}]
    assert row["responses"][0] == replies[1] and len(row["responses"]) == 3
    assert row["ranking"][1] == 0  # the reply the labeler saw in the chat, moved down one place
    assert row["prompt"] == f"User: hello there\n\nAssistant: {replies[0]}\n\nUser: tell me more"
