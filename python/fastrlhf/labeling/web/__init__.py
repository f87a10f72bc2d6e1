"""Human feedback in the browser: a local web app where a team ranks the K answers to each prompt.

answers.py  the answers file served (prompt id, prompt, K responses) and sampling it from an SFT model
labels.py   one labeler's append-only log, replayed into live rankings and skips
store.py    assignment (labels_per_prompt), submit / skip / undo with fsync, progress, the merged rankings
agreement.py  pairwise agreement between labelers
server.py   the Starlette app and uvicorn server (the `web` extra); static/ holds the page, plain JS

Only server.py needs the `web` extra; the rest (and `label-agreement`) runs on the core install.
"""
