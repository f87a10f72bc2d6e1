"""The labeling page in a real browser: Debian's headless Chromium driven by selenium. A person names
themselves, ranks by keyboard and by dragging, flags, skips, undoes, reloads mid-way; hostile model output
stays inert text. FASTRLHF_WEB_SCREENSHOT=path.png also saves the screenshot shown in docs/labeling.md."""

import json
import os
import shutil

import pytest
from fastrlhf.data.formats import read_rankings
from fastrlhf.labeling.web.answers import read_answers
from fastrlhf.labeling.web.labels import read_labels
from helpers.web import Server, wait_for

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/lib/chromium/chromedriver",) if os.path.exists(p)), None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no Chromium/chromedriver found (Debian: apt-get install chromium chromium-driver; .ci/run does)",
    ),
]

HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    '<a href="javascript:window.__pwned = 3">click me</a>',
    "  indented\n\ttabbed   and   spaced\n" + "y" * 6000,  # whitespace kept; a very long unbroken line
]
ITEMS = [
    ("<b>Which answer is safe?</b>", HOSTILE),
    (
        "Continue the line: The sea at dawn",
        ["was calm and bright with hope.", "is cold.", "and the gulls cried out in joy!", "sea sea sea sea"],
    ),
    ("What is 12+30?", ["42", "41", "forty-two", "12"]),
    ("What is 7*6?", ["42", "48", "13", "I don't know"]),
    ("Name a colour.", ["blue", "Blue!", "a colour", "seven"]),
    ("What is 2+2?", ["4", "5", "22", "four"]),
]


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.implicitly_wait(0)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("web_browser")
    (d / "answers.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "responses": r}) + "\n" for p, r in ITEMS)
    )
    # 2 labels per prompt: eve, who looks at the hostile prompt first, does not keep it from ana
    with Server(d / "answers.jsonl", d / "rankings.jsonl", "--labels-per-prompt", 2) as srv:
        srv.dir, srv.ids = d, [it.id for it in read_answers(d / "answers.jsonl")]
        yield srv


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def until(driver, cond, what):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: cond(), message=what)


def showing(driver, pid):
    until(driver, lambda: by_id(driver, "prompt-id").text == pid, f"prompt {pid} on screen")


def type_keys(driver, *keys):
    driver.switch_to.active_element.send_keys(*keys)  # to whatever has the focus: keyboard only


def card_texts(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#answers .text')].map(e => e.textContent)"
    )


def test_hostile_answers_are_inert_text_and_the_layout_holds(driver, served):
    from selenium.webdriver.common.by import By

    driver.get(served.url)
    driver.execute_script("localStorage.setItem('fastrlhf-labeler', 'eve')")  # a name kept from earlier
    driver.get(served.url)
    showing(driver, served.ids[0])
    assert by_id(driver, "prompt").text == ITEMS[0][0]  # shown as written, not as bold HTML
    assert card_texts(driver) == HOSTILE  # exactly, whitespace included
    assert driver.find_elements(By.CSS_SELECTOR, "#work img, #work script, #work a, #work b") == []
    assert driver.execute_script("return window.__pwned") is None
    for width in (1200, 420):  # side by side, then stacked on a narrow screen
        driver.set_window_size(width, 900)
        until(driver, lambda: driver.execute_script("return innerWidth") <= width, "resized")
        layout = driver.execute_script(
            "const r = [...document.querySelectorAll('#answers .card')].map(c => c.getBoundingClientRect());"
            "return {page: document.documentElement.scrollWidth, inner: innerWidth,"
            " lefts: r.map(x => x.left), rights: r.map(x => x.right), tops: r.map(x => x.top)}"
        )
        assert layout["page"] <= layout["inner"] and max(layout["rights"]) <= layout["inner"]  # no overflow
        if width == 1200:
            assert len(set(layout["tops"])) == 1 and len(set(layout["lefts"])) == 4
        else:
            assert len(set(layout["lefts"])) == 1 and layout["tops"] == sorted(layout["tops"])
    driver.set_window_size(1200, 900)
    driver.execute_script("localStorage.clear()")


def test_a_labeler_ranks_by_keyboard_and_drag_flags_skips_undoes_and_reloads(driver, served):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ids = served.ids
    driver.get(served.url)
    until(driver, lambda: by_id(driver, "login").is_displayed(), "the name is asked first")
    type_keys(driver, "ana", Keys.ENTER)
    showing(driver, ids[0])
    assert by_id(driver, "name").text == "ana"
    type_keys(driver, "4 3 2 1", Keys.ENTER)  # 1: keyboard

    showing(driver, ids[1])
    type_keys(driver, "2143")
    assert [c.text.split("\n")[0] for c in driver.find_elements(By.CSS_SELECTOR, ".handle")] == [
        "#1 · Answer 2",
        "#2 · Answer 1",
        "#3 · Answer 4",
        "#4 · Answer 3",
    ]
    if os.environ.get("FASTRLHF_WEB_SCREENSHOT"):  # docs/labeling.png
        driver.set_window_size(1150, 600)
        driver.save_screenshot(os.environ["FASTRLHF_WEB_SCREENSHOT"])
        driver.set_window_size(1200, 900)
    type_keys(driver, Keys.TAB, Keys.TAB, Keys.SPACE, Keys.SHIFT + Keys.TAB, Keys.SHIFT + Keys.TAB)
    type_keys(driver, Keys.ENTER)  # 2: keyboard, flagged harmful

    showing(driver, ids[2])
    type_keys(driver, "1 1")
    until(driver, lambda: "twice" in by_id(driver, "message").text, "a repeated number is pointed out")
    type_keys(driver, Keys.BACKSPACE * 3, "12", Keys.ENTER)
    until(driver, lambda: "Rank every answer" in by_id(driver, "message").text, "an incomplete ranking")
    type_keys(driver, Keys.BACKSPACE * 2, "1234", Keys.ENTER)  # 3: keyboard

    showing(driver, ids[3])
    handles = driver.find_elements(By.CSS_SELECTOR, ".handle")
    target = driver.find_elements(By.CSS_SELECTOR, ".card")[0]
    ActionChains(driver).click_and_hold(handles[2]).move_by_offset(-30, 5).move_to_element(target).pause(
        0.1
    ).release().perform()  # 4: drag answer 3 to the top
    until(driver, lambda: by_id(driver, "ranking").get_attribute("value") == "3 1 2 4", "the drag ranks")
    by_id(driver, "submit").click()

    showing(driver, ids[4])
    ActionChains(driver).key_down(Keys.ALT).send_keys("u").key_up(Keys.ALT).perform()  # undo: 4 comes back
    showing(driver, ids[3])
    until(driver, lambda: "is back" in by_id(driver, "message").text, "undo says what it did")
    assert by_id(driver, "ranking").get_attribute("value") == ""
    type_keys(driver, "4321", Keys.ENTER)

    showing(driver, ids[4])
    by_id(driver, "skip-reason").send_keys("not a question I can judge", Keys.ENTER)  # 5: skip

    showing(driver, ids[5])
    type_keys(driver, "2")
    driver.refresh()  # reload mid-way: the name is kept, the same prompt comes back
    showing(driver, ids[5])
    assert not by_id(driver, "login").is_displayed()
    assert by_id(driver, "progress-text").text.startswith("you: 5 / 6")
    type_keys(driver, "1234", Keys.ENTER)
    until(driver, lambda: by_id(driver, "finished").is_displayed(), "nothing left")

    log = served.dir / "rankings.labels" / "ana.jsonl"
    got = [(x.prompt_id, x.ranking, x.skip, x.flags) for x in read_labels(log).labels]
    assert got == [
        (ids[0], (3, 2, 1, 0), None, ()),
        (ids[1], (1, 0, 3, 2), None, ("harmful",)),
        (ids[2], (0, 1, 2, 3), None, ()),
        (ids[3], (3, 2, 1, 0), None, ()),  # the dragged (2, 0, 1, 3) was undone
        (ids[4], None, "not a question I can judge", ()),
        (ids[5], (0, 1, 2, 3), None, ()),
    ]
    assert sum('"undo"' in line for line in log.read_text().splitlines()) == 1
    assert any(json.loads(line).get("ranking") == [2, 0, 1, 3] for line in log.read_text().splitlines())
    out = served.dir / "rankings.jsonl"
    assert wait_for(lambda: len(read_rankings(out)) == 5)
    assert [r.prompt for r in read_rankings(out)] == [ITEMS[i][0] for i in (0, 1, 2, 3, 5)]
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []  # no script error, no content-security-policy violation
