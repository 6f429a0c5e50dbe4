// The model card: whatever /model-info gives, read defensively (fields may be added or typed).
const METRIC_NAMES = {
  accuracy: "Accuracy", precision: "Precision", recall: "Recall", f1: "F1 score",
  roc_auc: "ROC AUC", neither_share: "Share called neither",
};

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(+value.toPrecision(6));
  if (Array.isArray(value)) return value.map(formatValue).join(", ");
  if (value && typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function metricName(name) {
  if (name === "positive_share" && classes) return `Share called ${classes[1]}`;
  if ((name === "precision" || name === "recall") && classes) return `${METRIC_NAMES[name]} (${classes[1]})`;
  return METRIC_NAMES[name] || name.replaceAll("_", " ");
}

function metricsTable(metrics) {
  const rows = [];
  for (const [name, value] of Object.entries(metrics)) {
    if (/_(low|high)$/.test(name) && (name.replace(/_(low|high)$/, "") in metrics)) continue;
    const number = Number(value);
    const fraction = typeof value !== "boolean" && Number.isFinite(number) && number >= 0 && number <= 1;
    // An area under a curve reads as a score (0.979); the other fractions as percentages.
    let shown = !fraction ? formatValue(value) : /auc/.test(name) ? number.toFixed(3) : percent(number);
    const low = Number(metrics[`${name}_low`]), high = Number(metrics[`${name}_high`]);
    if (Number.isFinite(low) && Number.isFinite(high)) shown += ` (95% interval ${percent(low)}–${percent(high)})`;
    const row = element("tr", {}, element("th", { scope: "row" }, metricName(name)),
                        element("td", {}, shown));
    row.dataset.metric = name;
    rows.push(row);
  }
  return element("table", {},
    element("caption", { className: "muted" }, "Measured on the held-out test photos"),
    element("tbody", {}, ...rows));
}

function flatten(object, prefix = "") {
  return Object.entries(object || {}).flatMap(([key, value]) =>
    value && typeof value === "object" && !Array.isArray(value)
      ? flatten(value, `${prefix}${key}.`) : [[`${prefix}${key}`, value]]);
}

function showModelCard(info) {
  const facts = [];
  const add = (term, value) => {
    if (value === undefined || value === null || value === "") return;
    facts.push(element("dt", {}, term), element("dd", {}, formatValue(value)));
  };
  add("Model", info.model);
  add("Version", info.version);
  // No "trained at": the bento is built byte for byte the same from the same inputs, so it
  // carries no time; the version (a hash of model, card and code) and the revision name it.
  if (info.git_revision !== undefined) {
    add("Git revision", `${formatValue(info.git_revision)}${info.git_dirty === true ? " (with uncommitted changes)" : ""}`);
  }
  add("Engine", info.engine);
  if (Array.isArray(info.classes)) add("Classes", info.classes.join(" / "));
  if (info.threshold !== undefined && Array.isArray(info.classes)) {
    add("Decision", `${info.classes[1]} when P(${info.classes[1]}) ≥ ${formatValue(info.threshold)}`);
  }
  const section = $("model-card");
  const parts = [element("dl", {}, ...facts)];
  if (info.test_metrics && typeof info.test_metrics === "object") parts.push(metricsTable(info.test_metrics));
  const params = flatten(info.train_params);
  if (params.length) {
    parts.push(element("details", {}, element("summary", {}, "Training parameters"),
      element("dl", {}, ...params.flatMap(([key, value]) => [element("dt", {}, key), element("dd", {}, formatValue(value))]))));
  }
  $("model-loading").replaceWith(...parts);
  section.dataset.loaded = "true";
}

// Settles once /model-info has answered (or failed): drops wait for its batch size.
const modelCardLoaded = keyedFetch("model-info")
  .then(async (response) => {
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    if (Array.isArray(info.classes) && info.classes.length === 2) classes = info.classes;
    if (Number.isInteger(info.max_batch_files) && info.max_batch_files > 0) batchSize = info.max_batch_files;
    showModelCard(info);
  })
  .catch((error) => {
    $("model-loading").textContent = `The model card is unavailable (${error.message}).`;
  });
render();
