// The labeling page: one prompt at a time, its answers ranked best first by dragging or typing.
// Model output is untrusted: it only ever reaches the page through textContent, never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const token = document.querySelector('meta[name="token"]').content;
  const NAME_KEY = "fastrlhf-labeler";
  const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$/;
  let labeler = localStorage.getItem(NAME_KEY) || "";
  let item = null; // {id, prompt, responses} on screen
  let order = []; // answer indices as shown, best first
  let ranked = 0; // how many of order the labeler has placed (all of them when the ranking is complete)
  let last = null; // {sid, prompt_id} of the last live submission, for undo
  let pending = null; // {key, sid} of a submission not yet acknowledged: a retry reuses its sid
  let busy = false;

  function newSid() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function say(text, kind) {
    $("message").textContent = text;
    $("message").className = kind || "";
  }

  // GET when body is undefined, else POST with the token in a header. A network error (the server is
  // restarting) is retried with the same body, so the same sid: the server stores a retry once.
  async function api(path, body) {
    const headers = { "X-Token": token };
    const opts = body === undefined ? { headers } : {
      method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    for (let attempt = 0; ; attempt++) {
      let res;
      try {
        res = await fetch(path, opts);
      } catch (err) {
        if (attempt >= 5) throw new Error("the server does not answer; nothing was lost, try again");
        await new Promise((r) => setTimeout(r, 200 * 2 ** attempt));
        continue;
      }
      let data = {};
      try { data = await res.json(); } catch (_) { /* an error page without JSON */ }
      if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
      return data;
    }
  }

  // "2 1 4 3", "2,1,4,3" or "2143" (K <= 9), 1-based -> 0-based answer indices, and what is wrong if anything
  function parseTyped(text, k) {
    const s = text.trim().replace(/,/g, " ");
    const parts = s === "" ? [] : (/\s/.test(s) || k > 9 ? s.split(/\s+/) : s.split(""));
    const out = [];
    for (const p of parts) {
      const n = Number(p);
      if (!/^\d+$/.test(p) || n < 1 || n > k) return { typed: out, error: `"${p}" is not an answer number (1-${k})` };
      if (out.includes(n - 1)) return { typed: out, error: `${n} is there twice` };
      out.push(n - 1);
    }
    return { typed: out, error: null };
  }

  function drawCards() {
    const cards = order.map((idx, pos) => {
      const li = document.createElement("li");
      li.className = pos < ranked ? "card ranked" : "card";
      li.dataset.index = String(idx);
      const handle = document.createElement("div");
      handle.className = "handle";
      handle.title = "drag to reorder";
      handle.textContent = (pos < ranked ? `#${pos + 1} · ` : "") + `Answer ${idx + 1}`;
      handle.addEventListener("pointerdown", startDrag);
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = item.responses[idx];
      li.append(handle, text);
      return li;
    });
    $("answers").replaceChildren(...cards);
  }

  // drag and drop on pointer events (mouse, pen and touch alike): the card moves to the place of the card
  // under the pointer; on release the whole order on screen is the ranking. The listeners sit on the
  // document, not on a captured handle: moving the card in the DOM would drop a pointer capture.
  function startDrag(e) {
    if (e.button !== 0 || busy) return;
    e.preventDefault();
    const card = e.currentTarget.parentElement;
    const before = order.join();
    card.classList.add("dragging");
    const move = (ev) => {
      const over = document.elementsFromPoint(ev.clientX, ev.clientY)
        .map((el) => el.closest(".card")).find((c) => c && c !== card);
      if (!over) return;
      const cards = [...$("answers").children];
      $("answers").insertBefore(card, cards.indexOf(card) < cards.indexOf(over) ? over.nextSibling : over);
    };
    const end = () => {
      document.removeEventListener("pointermove", move);
      document.removeEventListener("pointerup", end);
      document.removeEventListener("pointercancel", end);
      card.classList.remove("dragging");
      const now = [...$("answers").children].map((c) => Number(c.dataset.index));
      if (now.join() !== before) {
        order = now;
        ranked = order.length;
        $("ranking").value = order.map((i) => i + 1).join(" ");
        say("");
      }
      drawCards();
      $("ranking").focus();
    };
    document.addEventListener("pointermove", move);
    document.addEventListener("pointerup", end);
    document.addEventListener("pointercancel", end);
  }

  function showProgress(p) {
    $("bar").max = Math.max(p.total, 1);
    $("bar").value = p.done;
    $("progress-text").textContent = `you: ${p.done} / ${p.total} · all labelers: ${p.filled} / ${p.needed} labels`;
  }

  function show(data) {
    last = data.last;
    $("undo").disabled = !last;
    showProgress(data.progress);
    if (!$("flags").childElementCount) {
      for (const f of data.flags) {
        const label = document.createElement("label");
        const box = document.createElement("input");
        box.type = "checkbox";
        box.value = f;
        label.append(box, ` flag ${f}`);
        $("flags").append(label);
      }
    }
    $("work").hidden = !data.item;
    $("finished").hidden = !!data.item;
    if (!data.item) { item = null; return; }
    if (!item || item.id !== data.item.id) {
      item = data.item;
      order = item.responses.map((_, i) => i);
      ranked = 0;
      pending = null;
      $("ranking").value = "";
      $("skip-reason").value = "";
      for (const box of $("flags").querySelectorAll("input")) box.checked = false;
    }
    $("prompt-id").textContent = item.id;
    $("prompt").textContent = item.prompt;
    drawCards();
    $("ranking").focus();
  }

  async function load() {
    try {
      show(await api(`/api/next?labeler=${encodeURIComponent(labeler)}`));
    } catch (err) {
      say(err.message, "error");
    }
  }

  async function send(path, body, done) {
    if (busy) return;
    busy = true;
    try {
      const key = JSON.stringify(body);
      if (!pending || pending.key !== key) pending = { key, sid: newSid() };
      const r = await api(path, { ...body, sid: pending.sid });
      pending = null;
      say(r.duplicate ? `${done} (it had been saved already)` : done, "ok");
      await load();
    } catch (err) {
      say(err.message, "error");
    } finally {
      busy = false;
    }
  }

  function flags() {
    return [...$("flags").querySelectorAll("input:checked")].map((b) => b.value);
  }

  function submitRanking() {
    if (!item) return;
    const k = item.responses.length;
    if (ranked < k) {
      say(`Rank every answer: type each of the numbers 1-${k} once, best first, or drag the cards.`, "error");
      return;
    }
    send("/api/submit", { labeler, prompt_id: item.id, ranking: order, flags: flags() }, `Saved ${item.id}.`);
  }

  function skip() {
    if (!item) return;
    send("/api/submit", { labeler, prompt_id: item.id, skip: $("skip-reason").value, flags: flags() }, `Skipped ${item.id}.`);
  }

  function undo() {
    if (!last) { say("Nothing to undo.", "error"); return; }
    const what = last.prompt_id;
    send("/api/undo", { labeler, target: last.sid }, `Undone: ${what} is back.`);
  }

  function start() {
    $("login").hidden = !!labeler;
    $("who").hidden = !labeler;
    $("tools").hidden = !labeler;
    if (!labeler) {
      $("work").hidden = true;
      $("finished").hidden = true;
      $("name-input").focus();
      return;
    }
    $("name").textContent = labeler;
    load();
  }

  $("ranking").addEventListener("input", () => {
    if (!item) return;
    const { typed, error } = parseTyped($("ranking").value, item.responses.length);
    order = [...typed, ...item.responses.map((_, i) => i).filter((i) => !typed.includes(i))];
    ranked = typed.length;
    drawCards();
    say(error || "", error ? "error" : "");
  });
  $("rank-form").addEventListener("submit", (e) => { e.preventDefault(); submitRanking(); });
  $("skip-form").addEventListener("submit", (e) => { e.preventDefault(); skip(); });
  $("undo").addEventListener("click", undo);
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("name-input").value.trim();
    if (!NAME_RE.test(name)) {
      say("A name is 1-40 letters, digits, '_', '.' or '-', not starting with '.' or '-'.", "error");
      return;
    }
    localStorage.setItem(NAME_KEY, name);
    labeler = name;
    say("");
    start();
  });
  $("rename").addEventListener("click", () => {
    localStorage.removeItem(NAME_KEY);
    labeler = "";
    item = null;
    start();
  });
  document.addEventListener("keydown", (e) => {
    if (!e.altKey || !labeler) return;
    if (e.code === "KeyU") { e.preventDefault(); undo(); }
    if (e.code === "KeyS") { e.preventDefault(); skip(); }
  });
  start();
})();
