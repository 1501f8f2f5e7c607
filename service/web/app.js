// The page's shell: sign-in, the five views (Predict, Review, Dataset, Train, Versions) behind
// the URL hash, and the status line. Each view module exports `mount(root, ctx)`, which may
// return a function that unmounts it (stops streams, key handlers, object URLs).
import { api, session, ApiError } from "./api.js";
import { h, clear } from "./dom.js";

const VIEWS = {
  predict: () => import("./predict.js"),
  review: () => import("./review.js"),
  dataset: () => import("./dataset.js"),
  train: () => import("./train.js"),
  versions: () => import("./versions.js"),
};

const root = document.getElementById("view");
const statusLine = document.getElementById("status");
const dialog = document.getElementById("sign-in-dialog");
const tokenInput = document.getElementById("token-input");
const signInError = document.getElementById("sign-in-error");
let unmount = null;
let config = { predict_open: true };
let statusTimer = null;

function say(message, kind = "info") {
  statusLine.textContent = message;
  statusLine.dataset.kind = kind;
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => { statusLine.textContent = ""; }, 6000);
}

function signedIn() { return !!session.token; }

function showAccount() {
  document.getElementById("who").textContent = signedIn() ? "Signed in" : "Not signed in";
  document.getElementById("sign-in").hidden = signedIn();
  document.getElementById("sign-out").hidden = !signedIn();
}

function openSignIn() {
  signInError.textContent = "";
  tokenInput.value = "";
  dialog.showModal();
  tokenInput.focus();
}

// A message in place of a view that needs the token.
function needSignIn(what) {
  return h("section", { class: "card notice" },
    h("h2", {}, "Sign in to continue"),
    h("p", {}, `${what} needs the API token.`),
    h("button", { type: "button", class: "primary", onclick: openSignIn }, "Sign in"));
}

const ctx = {
  get config() { return config; },
  signedIn,
  needSignIn,
  say,
  openSignIn,
  // An ApiError of 401 means the token is wrong or gone: drop it and ask again.
  failed(err, where) {
    if (err instanceof ApiError && err.status === 401 && signedIn()) {
      session.clear();
      showAccount();
      say("The token was refused; sign in again.", "error");
    }
    return err instanceof ApiError ? err.text : String(err);
  },
};

async function route() {
  const name = (location.hash.slice(1) || "predict").split("/")[0];
  const view = VIEWS[name] ? name : "predict";
  for (const a of document.querySelectorAll("[data-view]")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (unmount) { try { unmount(); } catch { /* a view that failed to clean up */ } }
  unmount = null;
  clear(root);
  const module = await VIEWS[view]();
  const current = (location.hash.slice(1) || "predict").split("/")[0];
  if ((VIEWS[current] ? current : "predict") !== view) return; // navigated meanwhile
  unmount = module.mount(root, ctx) || null;
  document.title = `visionloop · ${view[0].toUpperCase()}${view.slice(1)}`;
}

document.getElementById("sign-in").addEventListener("click", openSignIn);
document.getElementById("sign-in-cancel").addEventListener("click", () => dialog.close());
document.getElementById("sign-out").addEventListener("click", () => {
  session.clear();
  showAccount();
  say("Signed out.");
  route();
});
document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = tokenInput.value.trim();
  if (!token) return;
  signInError.textContent = "Checking…";
  try {
    await api("/v1/dataset", { token });
  } catch (err) {
    signInError.textContent = err instanceof ApiError && (err.status === 401 || err.status === 403)
      ? `Refused: ${err.text}` : `Could not check the token: ${err.text || err}`;
    return;
  }
  session.set(token);
  tokenInput.value = "";
  dialog.close();
  showAccount();
  say("Signed in.");
  route();
});
window.addEventListener("hashchange", route);

(async () => {
  showAccount();
  try {
    config = await api("/web/config", { token: null });
  } catch (err) {
    say(`Could not read the page configuration: ${err.text || err}`, "error");
  }
  route();
})();
