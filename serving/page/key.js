"use strict";
// Where the service requires an API key (docs/serving.md, *API keys*), it answers 401: the
// page then asks for the key, keeps it for this tab only (sessionStorage: gone when the tab
// closes, never sent anywhere but this service) and sends it with every request.
const API_KEY_HEADER = "{{API_KEY_HEADER}}";
const KEY_STORAGE = "dandelion-api-key";
let keyAsked = null;  // the answer to the form shown, shared by every request that waits for it

function storedKey() {
  try { return sessionStorage.getItem(KEY_STORAGE); } catch (_) { return null; }
}

// Show the key form with `message`; settles once a key is entered (and stored).
function askForKey(message) {
  if (keyAsked) return keyAsked;
  const form = document.getElementById("key-form");
  const field = document.getElementById("key");
  document.getElementById("key-message").textContent = message;
  form.hidden = false;
  field.value = "";
  field.focus();
  keyAsked = new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      const key = field.value.trim();
      if (!key) return;
      try { sessionStorage.setItem(KEY_STORAGE, key); } catch (_) { /* storage off: this once */ }
      form.hidden = true;
      field.value = "";
      keyAsked = null;
      resolve(key);
    };
  });
  return keyAsked;
}

// fetch(path, options()) with the key, if any; on a 401, ask for the key (again, if the one
// sent was refused) and send once more. `options` makes a new request body for each try.
async function keyedFetch(path, options = () => ({})) {
  let key = storedKey();
  for (;;) {
    const init = options();
    if (key) init.headers = { ...(init.headers || {}), [API_KEY_HEADER]: key };
    const response = await fetch(path, init);
    if (response.status !== 401) return response;
    if (key && storedKey() === key) {
      try { sessionStorage.removeItem(KEY_STORAGE); } catch (_) { /* nothing kept */ }
    }
    key = await askForKey(key ? "That API key was refused: enter a valid one."
                              : "This service needs an API key: enter the one you were given.");
  }
}
