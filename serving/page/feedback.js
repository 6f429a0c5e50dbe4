// Feedback on a verdict: "right", or "wrong, it is …" the other class or neither, sent to
// POST /feedback with the photo itself (the service cannot find a photo from its answer_id).
// The label the service takes for "neither of the classes": serving/settings.py NEITHER_LABEL,
// written in by serving/page.py when the page is assembled.
const NEITHER_LABEL = "{{NEITHER_LABEL}}";

// The labels a verdict can be corrected to: the other class and neither, or for a "neither"
// verdict both classes.
function otherLabels(answer) {
  const labels = [...(classes || Object.keys(answer.probabilities)), NEITHER_LABEL];
  return labels.filter((label) => label !== shownLabel(answer));
}

// What the card shows as the verdict: the label, or neither for a photo unlike the training ones.
function shownLabel(answer) {
  return answer.neither ? NEITHER_LABEL : answer.label;
}

// Send `label` for the entry's photo. The outcome is kept on the entry, as the lists are
// redrawn whole: entry.feedback = {state: "sending" | "stored" | "failed", message}.
async function sendFeedback(entry, label) {
  entry.feedback = { state: "sending", message: "Sending…" };
  render();
  const { answer_id, model_version } = entry.answer;
  try {
    // No retries: a busy service says when to try again, and the user decides whether to.
    await post("feedback", "image", [entry.file], { label, answer_id, model_version }, 0);
    entry.feedback = { state: "stored", message: `Thanks, stored: ${label}.` };
  } catch (error) {
    entry.feedback = { state: "failed", message: error.message };
  }
  render();
}

// The card's feedback buttons and what became of the last one pressed. After a stored
// feedback they stay disabled: the same answer once is enough.
function feedbackControls(entry) {
  const answer = entry.answer;
  const done = entry.feedback && ["sending", "stored"].includes(entry.feedback.state);
  const button = (text, label, meaning) => {
    const node = element("button", { type: "button", disabled: done }, text);
    node.dataset.label = label;
    node.setAttribute("aria-label", meaning);
    node.addEventListener("click", () => sendFeedback(entry, label));
    return node;
  };
  const box = element("div", { className: "feedback" },
    button("right", shownLabel(answer), "right"),
    element("span", { className: "muted" }, "wrong, it is"),
    ...otherLabels(answer).map((label) => button(label, label, `wrong, it is ${label}`)));
  box.setAttribute("role", "group");
  box.setAttribute("aria-label", "Is this verdict right?");
  if (entry.feedback) {
    const failed = entry.feedback.state === "failed";
    const note = element("div", { className: failed ? "feedback-note failed" : "feedback-note" },
                         entry.feedback.message);
    if (failed) note.setAttribute("role", "alert");
    return [box, note];
  }
  return [box];
}
