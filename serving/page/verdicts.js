"use strict";
// At most this many photos per /predict_batch request: /model-info's max_batch_files
// (params.yaml serve.max_batch_files); one per request if it cannot be read.
let batchSize = 1;
// The history keeps this many predictions; older ones drop off and free their thumbnail.
const HISTORY_LIMIT = 50;
// A 503 (busy, restarting) is retried after its Retry-After, at most this many times.
const BUSY_RETRIES = 3;
// What each status means, in front of the service's own {"error": ...} message.
const STATUS_MEANING = {
  400: "The upload was not understood",
  408: "The upload was too slow",
  413: "Too large",
  415: "Not a picture the service can read",
  422: "This picture cannot be classified",
  500: "The service failed",
  503: "The service is busy or restarting",
};

const $ = (id) => document.getElementById(id);
const drop = $("drop"), input = $("file"), status = $("status");
const verdictList = $("verdicts"), historyList = $("history-list");
let classes = null;  // from /model-info: [negative, positive]
let latest = [];     // entries shown under "Verdicts"
let history = [];    // entries shown under "This session", newest first

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function percent(value) {
  return `${(100 * value).toFixed(1)}%`;
}

function setStatus(text, isError = false) {
  status.textContent = text;
  status.className = isError ? "error" : "";
}

// Photos sent and not yet answered: they join the history when answered.
const pending = new Set();

// A thumbnail's object URL is freed once its entry is in no list.
function release(entry) {
  if (!pending.has(entry) && !latest.includes(entry) && !history.includes(entry)) {
    URL.revokeObjectURL(entry.url);
  }
}

class ServiceError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// POST the files in `field` and the text `fields` (those not null) to `path`; the JSON
// answer, or a ServiceError saying why not. A 503 is retried at most `retries` times.
async function post(path, field, files, fields = {}, retries = BUSY_RETRIES) {
  for (let attempt = 0; ; attempt++) {
    const request = () => {
      const form = new FormData();
      for (const file of files) form.append(field, file, file.name);
      for (const [name, value] of Object.entries(fields)) if (value != null) form.append(name, value);
      return { method: "POST", body: form };
    };
    let response;
    try {
      response = await keyedFetch(path, request);
    } catch (error) {
      throw new ServiceError(0, `Could not reach the service (${error.message})`);
    }
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: a proxy's page */ }
    if (response.ok && body) return body;
    const wait = Math.min(Math.max(Number(response.headers.get("Retry-After")) || 1, 1), 30);
    if (response.status === 503 && attempt < retries) {
      setStatus(`The service is busy: trying again in ${wait} s…`);
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      continue;
    }
    const meaning = STATUS_MEANING[response.status] || `HTTP ${response.status}`;
    const detail = String((body && body.error) || response.statusText || "no details").replace(/\.$/, "");
    const retry = response.status === 503 ? " Try again in a moment." : "";
    throw new ServiceError(response.status, `${meaning}: ${detail}.${retry}`);
  }
}

// Verdicts for `entries`, in order: one /predict_batch for several, /predict for one.
async function predict(entries) {
  if (entries.length === 1) {
    try {
      entries[0].answer = await post("predict", "image", [entries[0].file]);
    } catch (error) {
      entries[0].error = error.message;
    }
    return;
  }
  try {
    const body = await post("predict_batch", "images", entries.map((entry) => entry.file));
    body.predictions.forEach((answer, index) => { entries[index].answer = answer; });
  } catch (error) {
    // A batch is answered whole or not at all: when one file is refused (or the batch is
    // too large), ask for each file alone, so every good photo still gets its verdict.
    if (error.status >= 400 && error.status < 500) {
      for (const entry of entries) await predict([entry]);
    } else {
      for (const entry of entries) entry.error = error.message;
    }
  }
}

function probabilityBar(answer) {
  // The service lists the positive class first (serving/contract.py DecisionRule.verdict).
  const [negative, positive] = classes || Object.keys(answer.probabilities).reverse();
  const p = answer.probabilities[positive], q = answer.probabilities[negative];
  const bar = element("div", { className: "bar", role: "img" });
  bar.setAttribute("aria-label", `${positive} ${percent(p)}, ${negative} ${percent(q)}`);
  bar.append(element("span", { className: "positive", style: `width: ${100 * p}%` }),
             element("span", { className: "negative", style: `width: ${100 * q}%` }));
  const legend = element("div", { className: "bar-legend" },
    element("span", {}, `${positive} ${percent(p)}`), element("span", {}, `${negative} ${percent(q)}`));
  legend.setAttribute("aria-hidden", "true");
  return [bar, legend];
}

// A thumbnail, or a plain box when the file is not a picture the browser can show.
function thumbnail(entry, alt) {
  const image = element("img", { src: entry.url, alt });
  image.addEventListener("error", () => image.replaceWith(
    element("div", { className: "no-thumb", title: "no preview" }, "?")));
  return image;
}

function card(entry) {
  const body = element("div", { className: "body" },
                       element("div", { className: "filename" }, entry.name));
  const item = element("li", { className: "card" },
                       thumbnail(entry, `photo ${entry.name}`), body);
  item.dataset.filename = entry.name;
  const answer = entry.answer;
  if (entry.error) {
    item.classList.add("error");
    body.append(element("div", { className: "failed", role: "alert" }, entry.error));
  } else if (!answer) {
    body.append(element("div", { className: "muted" }, "Looking…"));
  } else {
    item.dataset.answerId = answer.answer_id;  // what a feedback on this verdict quotes
    // A photo unlike the training photos is "neither": its label is only the nearer class.
    body.append(
      element("div", { className: "verdict" }, answer.neither ? NEITHER_LABEL : answer.label),
      element("div", { className: "confidence" }, answer.neither
        ? `nearer to ${answer.label} (${percent(answer.confidence)})`
        : `${percent(answer.confidence)} confident`),
      ...probabilityBar(answer));
    if (answer.neither) {
      item.classList.add("is-neither");
      body.append(element("div", { className: "neither" },
        "This looks like neither a dandelion nor grass: the picture is unlike anything the " +
        `model was trained on (novelty ${Number(answer.novelty).toFixed(1)}, above 1 is unlike).`));
    }
    body.append(...feedbackControls(entry));
  }
  return item;
}

function historyItem(entry) {
  const answer = entry.answer;
  const what = answer
    ? `${answer.neither ? "neither (nearer: " + answer.label + ")" : answer.label}, ${percent(answer.confidence)}`
    : "not classified";
  const item = element("li", {},
    thumbnail(entry, ""),
    element("div", { className: "what" },
            element("div", { className: "history-verdict" }, what),
            element("div", { className: "filename" }, entry.name)),
    element("time", { dateTime: entry.at.toISOString() }, entry.at.toLocaleTimeString()));
  item.dataset.filename = entry.name;
  return item;
}

function render() {
  verdictList.replaceChildren(...latest.map(card));
  historyList.replaceChildren(...history.map(historyItem));
  $("history-empty").hidden = history.length > 0;
  $("clear-history").hidden = history.length === 0;
}

async function classify(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  const previous = latest;
  const batch = files.map((file) => ({ file, name: file.name, url: URL.createObjectURL(file), at: new Date() }));
  batch.forEach((entry) => pending.add(entry));
  latest = batch;
  previous.forEach(release);
  setStatus(`Classifying ${files.length} photo${files.length > 1 ? "s" : ""}…`);
  render();
  await modelCardLoaded;
  for (let start = 0; start < batch.length; start += batchSize) {
    const chunk = batch.slice(start, start + batchSize);
    await predict(chunk);
    chunk.forEach((entry) => pending.delete(entry));
    // Newest first, a drop's photos in the order given; the oldest drop off.
    const kept = [...chunk, ...history];
    history = kept.slice(0, HISTORY_LIMIT);
    kept.slice(HISTORY_LIMIT).forEach(release);
    render();
  }
  if (latest !== batch) return;  // a newer drop reports for itself
  const failed = batch.filter((entry) => entry.error).length;
  setStatus(failed ? `${failed} of ${batch.length} could not be classified (see below).`
                   : `Done: ${batch.length} photo${batch.length > 1 ? "s" : ""} classified.`, failed > 0);
}

input.addEventListener("change", () => { classify(input.files); input.value = ""; });
// Drops anywhere on the page count: a photo dropped beside the box must not replace the page
// (and the session's history) with the image itself.
window.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
window.addEventListener("dragleave", (event) => { if (!event.relatedTarget) drop.classList.remove("over"); });
window.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer) classify(event.dataTransfer.files);
});
$("clear-history").addEventListener("click", () => {
  const cleared = history;
  history = [];
  cleared.forEach(release);
  render();
});

