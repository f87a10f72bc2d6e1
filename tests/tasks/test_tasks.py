import pytest
from fastrlhf.data.formats import SFTExample
from fastrlhf.labeling.labelers import make_labeler
from fastrlhf.tasks.arithmetic import ArithmeticTask, Problem, make_problems, parse_answer, parse_problem
from fastrlhf.tasks.registry import load_task, task_names, task_options
from fastrlhf.tasks.sentiment import SentimentTask, make_sentiment_task, split_line, vader_compound

# --- arithmetic ----------------------------------------------------------------------------------------


def test_problem_prompt_and_answer():
    assert (Problem(37, "+", 45).prompt, Problem(37, "+", 45).answer) == ("What is 37+45?", "82")
    assert Problem(3, "-", 7).answer == "-4" and Problem(12, "*", 11).answer == "132"


def test_problems_are_deterministic_and_depend_on_the_seed():
    a = make_problems(50, seed=3)
    assert a == make_problems(50, seed=3)
    assert a != make_problems(50, seed=4)
    assert make_problems(20, seed=3) == a[:20]  # a longer draw extends a shorter one


@pytest.mark.parametrize(
    "ops,digits", [(("+",), (1,)), (("+", "-", "*"), (1, 2)), (("*",), (2,)), (("-",), (1, 3))]
)
def test_problems_respect_ops_and_digits_and_are_correct(ops, digits):
    allowed = {n for d in digits for n in (range(10) if d == 1 else range(10 ** (d - 1), 10**d))}
    for split in ("train", "heldout"):
        problems = make_problems(
            min(300, 10 * len(ops) * len(allowed) ** 2 // 100), split=split, ops=ops, digits=digits
        )
        assert len(set(problems)) == len(problems)  # distinct
        for p in problems:
            assert p.op in ops and p.a in allowed and p.b in allowed
            assert int(p.answer) == {"+": p.a + p.b, "-": p.a - p.b, "*": p.a * p.b}[p.op]
            assert parse_problem(p.prompt) == p


def test_splits_partition_the_whole_space():
    train = make_problems(90, split="train", ops=("+",), digits=(1,), seed=1)
    heldout = make_problems(10, split="heldout", ops=("+",), digits=(1,), seed=2)
    assert len(set(train)) == 90 and len(set(heldout)) == 10
    assert set(train) | set(heldout) == {Problem(a, "+", b) for a in range(10) for b in range(10)}


def test_splits_never_overlap_whatever_the_seeds():
    heldout = {p for seed in range(3) for p in make_problems(200, split="heldout", seed=seed)}
    train = {p for seed in range(3) for p in make_problems(2000, split="train", seed=seed)}
    assert heldout and train and not heldout & train


def test_heldout_split_is_not_a_slice_of_the_space():
    # every tenth position of an affine permutation once held out only sums whose second operand ended
    # in 5 (the units-digit pairs of training never contained it): each (a, b) last-digit pair, each
    # operator and each tens-digit pair must appear in held-out as in train
    heldout = make_problems(1000, split="heldout", ops=("+",), digits=(1, 2))
    assert len({(p.a % 10, p.b % 10) for p in heldout}) == 100
    assert len({(p.a // 10, p.b // 10) for p in heldout}) == 100
    for last in range(10):  # about a tenth of them each (a binomial 100 +- 9.5)
        assert 60 < sum(p.b % 10 == last for p in heldout) < 140
    mixed = make_problems(3000, split="heldout", ops=("+", "-", "*"), digits=(1, 2))
    assert {p.op for p in mixed} == {"+", "-", "*"} and len({(p.op, p.b % 10) for p in mixed}) == 30


def test_large_spaces_sample_fast():
    problems = make_problems(5000, digits=(3, 4), seed=0)  # 3 * 9900^2 problems: never enumerated
    assert len(set(problems)) == 5000 and all(100 <= p.a <= 9999 for p in problems)


def test_too_many_problems_for_a_split():
    with pytest.raises(
        ValueError, match=r"n must be in 0..10 \(the heldout split of ops=\('\+',\), digits=\(1,\)\); got 11"
    ):
        make_problems(11, split="heldout", ops=("+",), digits=(1,))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"split": "test"}, r"split must be 'train' or 'heldout'; got 'test'"),
        ({"ops": ("/",)}, r"ops must be distinct operators from \['\*', '\+', '-'\]; got \('/',\)"),
        ({"ops": ()}, r"ops must be distinct operators"),
        ({"digits": (0,)}, r"digits must be distinct digit counts in 1..6; got \(0,\)"),
        ({"digits": (2, 2)}, r"digits must be distinct digit counts"),
    ],
)
def test_bad_arithmetic_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_problems(5, **kwargs)


@pytest.mark.parametrize(
    "text,value",
    [
        ("82", 82),
        (" -4 ", -4),
        ("+7", 7),
        ("082", 82),
        ("82\nWhat is 1+1?", 82),
        ("\n 5\n", 5),
        ("82 apples", None),
        ("eighty-two", None),
        ("", None),
        ("8.5", None),
        ("1" * 65, None),
        ("- 4", None),
    ],
)
def test_parse_answer(text, value):
    assert parse_answer(text) == value


@pytest.mark.parametrize(
    "prompt", ["What is 3 + 4?", "What is 3/4?", "what is 3+4?", "What is -3+4?", "Hello"]
)
def test_parse_problem_rejects_other_text(prompt):
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        parse_problem(prompt)


def test_arithmetic_task_demonstrations_rank_first():
    task = ArithmeticTask(n_train=100, n_heldout=20, seed=5)
    demos = task.demonstrations()
    assert [d.prompt for d in demos] == task.prompts("train") and len(task.prompts("heldout")) == 20
    assert not set(task.prompts("train")) & set(task.prompts("heldout"))
    lab = make_labeler("arithmetic")
    for d in demos[:20]:
        wrong = str(int(d.response) + 3)
        assert lab.rank(d.prompt, ["junk", wrong, d.response]) == [2, 1, 0]


# --- sentiment -----------------------------------------------------------------------------------------

LINES = [
    "First Citizen:",
    "Before we proceed any further, hear me speak.",
    "",
    "Now is the winter of our discontent",
    "Made glorious summer by this sun of York;",
    "O villain, villain, smiling, damned villain!",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:",
    "Good night, good night! parting is such sweet sorrow,",
    "Good night, good night! I hate and curse thee.",
    "I love thee, I love but thee, with a love that shall not die",
]


def test_split_line():
    assert split_line("  To be,  or not\tto be ", 3) == ("To be, or", " not to be")
    assert split_line("To be, or not", 3, min_response_words=2) is None
    assert split_line("", 1) is None


def test_sentiment_demonstrations_are_positive_continuations_of_train_prompts():
    lines = LINES + [f"Line {i} of the play: the lords are {w}" for i in range(200) for w in ("glad", "dead")]
    task = make_sentiment_task(lines, prompt_words=4)
    train, heldout = task.prompts("train"), task.prompts("heldout")
    assert len(set(train)) == len(train) and not set(train) & set(heldout)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.2  # about one in HELDOUT_EVERY
    demos = task.demonstrations()
    assert demos and all(d.prompt in train and vader_compound(d.response) >= 0.05 for d in demos)
    assert not any(d.response.endswith("dead") for d in demos)
    for d in demos:  # a demonstration is the corpus line itself
        assert any(" ".join(line.split()) == d.prompt + d.response for line in lines)


def test_sentiment_split_follows_the_opening_not_the_order_or_the_line():
    task = make_sentiment_task(LINES * 30, prompt_words=2)
    forward, backward = (
        make_sentiment_task(LINES, prompt_words=2),
        make_sentiment_task(LINES[::-1], prompt_words=2),
    )
    assert set(forward.prompts("heldout")) == set(backward.prompts("heldout"))
    # both "Good night," lines share an opening, so one prompt: (a held-out prompt never leaks into SFT)
    assert task.prompts("train").count("Good night,") + task.prompts("heldout").count("Good night,") == 1


def test_sentiment_uses_the_given_scorer_and_threshold():
    task = make_sentiment_task(LINES, prompt_words=2, score=lambda text: 1.0 if "summer" in text else -1.0)
    pairs = [split_line(line, 2, 2) for line in LINES]
    expected = [(p, r) for p, r in filter(None, pairs) if "summer" in r and p in task.prompts("train")]
    assert len(expected) == 2 and [(d.prompt, d.response) for d in task.demonstrations()] == expected
    assert make_sentiment_task(LINES, prompt_words=2, threshold=1.0).demonstrations() == []


def test_sentiment_needs_lines_with_enough_words():
    with pytest.raises(
        ValueError,
        match=r"the corpus gives 0 train and 0 held-out prompts from 3 lines \(a line needs >= 6 words\)",
    ):
        make_sentiment_task(["First Citizen:", "", "Speak, speak."])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"prompt_words": 0}, ValueError, r"prompt_words and min_response_words must be >= 1; got 0, 2"),
        ({"threshold": 2.0}, ValueError, r"threshold must be in \[-1, 1\]"),
        ({"lines": "one long string"}, TypeError, r"not one string"),
    ],
)
def test_bad_sentiment_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_sentiment_task(**{"lines": LINES, **kwargs})


# --- registry ------------------------------------------------------------------------------------------


def test_load_task_builds_each_task_with_its_labeler(tmp_path):
    assert task_names() == ["arithmetic", "sentiment", "tone"]
    arith = load_task("arithmetic", task_options("arithmetic", {"train_problems": 10, "heldout_problems": 5}))
    assert isinstance(arith, ArithmeticTask) and len(arith.prompts("heldout")) == 5
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(LINES * 3) + "\n")
    senti = load_task("sentiment", corpus=str(corpus))
    assert isinstance(senti, SentimentTask) and all(isinstance(d, SFTExample) for d in senti.demonstrations())
    for task in (arith, senti, load_task("tone")):
        assert make_labeler(task.name).name == task.name


def test_load_task_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'poetry'; valid names: arithmetic, sentiment, tone"):
        load_task("poetry")


def test_task_options_unknown_field_and_bad_value_are_named():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['arithmetic.n'\]"):
        task_options("arithmetic", {"n": 5})
    with pytest.raises(ValueError, match=r"arithmetic.max_digits must be in \[1, 6\]; got 7"):
        task_options("arithmetic", {"max_digits": 7})


def test_task_split_name_is_checked():
    with pytest.raises(ValueError, match=r"split must be 'train' or 'heldout'; got 'dev'"):
        make_sentiment_task(LINES * 3, prompt_words=2).prompts("dev")
    with pytest.raises(ValueError, match=r"split must be 'train' or 'heldout'; got 'dev'"):
        ArithmeticTask().prompts("dev")


# --- tone ----------------------------------------------------------------------------------------------


def test_tone_splits_partition_the_topics_and_demonstrations_are_train_only():
    from fastrlhf.tasks.tone import ToneTask, prompt_for, topics

    task = load_task("tone")
    assert isinstance(task, ToneTask)
    train, heldout = task.prompts("train"), task.prompts("heldout")
    assert sorted(train + heldout) == sorted(prompt_for(t) for t in topics())
    assert not set(train) & set(heldout) and len(heldout) > 90  # enough for a paired error of ~0.05
    assert train[0] == "Write a sentence about the ocean."
    demos = task.demonstrations()
    assert len(demos) > 200 and {d.prompt for d in demos} <= set(train)
    # kept for their form: one sentence, no preamble or list
    assert all(d.response[-1] in ".!?" and "\n" not in d.response and ":" not in d.response for d in demos)
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        task.prompts("test")


def test_tone_scores_tone_with_vader():
    from fastrlhf.tasks import tone

    assert (
        tone.score("", "What a lovely, wonderful day.") > 0.5 > tone.score("", "The chair is brown.") > -0.5
    )
    assert tone.preference is tone.score and tone.GOAL.max_minutes == 30 and "tone" in task_names()


def test_distinct_n_counts_distinct_word_ngrams():
    from fastrlhf.pipeline.evaluate import distinct_n

    assert distinct_n(["a b c", "a b d"]) == 3 / 4  # (a b) twice, (b c), (b d)
    assert distinct_n(["Good good good"]) == 1 / 2 and distinct_n(["one", ""]) == 0.0
