import { test, expect, BrowserContext, Frame, Page } from "@playwright/test";
import * as path from "node:path";
import { gotoHydrated, shot } from "./helpers";
import { HOST, STUDIO } from "../playwright.config";

// Every page runs under the server's Content-Security-Policy (server/src/web/security.rs) with no
// violation: the hydration scripts by hash, the wasm by 'wasm-unsafe-eval', no inline styles.

const FIXTURE = path.resolve(__dirname, "..", "fixtures", "photo-640x480.png");

/**
 * Records every CSP violation in any page or frame of the context: the `securitypolicyviolation`
 * events (a listener installed before the page's own scripts) and the browser's "Refused to …"
 * console errors. Other console errors and uncaught exceptions are kept apart.
 */
async function watchPolicy(context: BrowserContext) {
  const violations: string[] = [];
  const errors: string[] = [];
  await context.exposeBinding("__cspViolation", ({ frame }, v: string) => {
    violations.push(`${frame.url()}: ${v}`);
  });
  await context.addInitScript(() => {
    document.addEventListener(
      "securitypolicyviolation",
      (e) => {
        (window as any).__cspViolation(
          `${e.effectiveDirective} blocked ${e.blockedURI || "(inline)"} at ${e.sourceFile}:${e.lineNumber} ${e.sample}`
        );
      },
      true
    );
  });
  const onPage = (page: Page) => {
    page.on("console", (m) => {
      if (m.type() !== "error") return;
      if (/Content Security Policy|Refused to/i.test(m.text())) violations.push(`console: ${m.text()}`);
      else errors.push(m.text());
    });
    page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  };
  context.pages().forEach(onPage);
  context.on("page", onPage);
  return { violations, errors };
}

/**
 * The control: a style attribute set from script is refused by `style-src 'self'`, and the watcher
 * must hear it (so an empty list above means no violation, not a deaf watcher).
 */
async function expectWatcherHearsAViolation(target: Page | Frame, violations: string[]) {
  const before = violations.length;
  await target.evaluate(() => document.body.setAttribute("style", "outline: 1px solid red"));
  await expect.poll(() => violations.slice(before).join("\n")).toContain("style-src-attr");
  violations.splice(before);
}

/** Sets a range input's value the way a user's drag does (an input event). */
async function setRange(page: Page, selector: string, value: string) {
  await page.locator(selector).evaluate((el: HTMLInputElement, v) => {
    el.value = v;
    el.dispatchEvent(new Event("input", { bubbles: true }));
  }, value);
}

function expectStrictPolicy(csp: string | undefined, ancestors: string) {
  expect(csp).toBeDefined();
  const d = Object.fromEntries(
    csp!.split(";").map((s) => {
      const [name, ...v] = s.trim().split(/\s+/);
      return [name, v.join(" ")];
    })
  );
  const host = new URL(STUDIO).host;
  expect(d["default-src"]).toBe("'self'");
  expect(d["script-src"]).toMatch(/^'self' 'wasm-unsafe-eval'( 'sha256-[A-Za-z0-9+/]{43}=')+$/);
  expect(d["style-src"]).toBe("'self'");
  expect(d["img-src"]).toBe("'self' data: blob:");
  expect(d["connect-src"]).toBe(`'self' ws://${host} wss://${host}`);
  expect(d["object-src"]).toBe("'none'");
  expect(d["base-uri"]).toBe("'none'");
  expect(d["form-action"]).toBe("'self'");
  expect(d["frame-ancestors"]).toBe(ancestors);
}

test("CSP: studio (generate, transform, history), share page and 404 run without a violation", async ({ browser }) => {
  const context = await browser.newContext({ baseURL: STUDIO, viewport: { width: 1280, height: 900 } });
  const { violations, errors } = await watchPolicy(context);
  try {
    const page = await context.newPage();
    const home = await page.goto("/");
    expectStrictPolicy(home!.headers()["content-security-policy"], "'self'");
    await gotoHydrated(page, "/");

    // Generate: the progress bar, live previews (data: URLs) and the result
    await page.locator("#gen-prompt").fill("a lantern on a pier, csp check");
    await setRange(page, "#gen-steps", "4");
    await page.selectOption("#gen-ratio", "1024x1024");
    await page.locator("#gen-submit").click();
    await expect(page.locator("#gen-output").getByTestId("result-image")).toBeVisible();
    await page.context().grantPermissions(["clipboard-read", "clipboard-write"]);
    await page.getByTestId("copy-seed").click();
    await expect(page.getByTestId("copy-seed")).toHaveText("Copied ✓");
    const share = await page.getByTestId("share-url").inputValue();

    // Transform: an upload previewed from a blob:/data: URL, then a run
    await page.locator("#tab-transform").click();
    await page.locator("#tr-file").setInputFiles(FIXTURE);
    await expect(page.getByTestId("input-preview")).toBeVisible();
    await page.locator("#tr-prompt").fill("the same pier in watercolor");
    await setRange(page, "#tr-steps", "4");
    await page.locator("#tr-submit").click();
    await expect(page.locator("#tr-output").getByTestId("result-image")).toBeVisible();

    // History: thumbnails from /thumbs
    await page.locator("#tab-history").click();
    await expect(page.getByTestId("history")).toBeVisible();
    await expect(page.getByTestId("history-item").first()).toBeVisible();
    await page.screenshot({ path: shot("csp-studio"), fullPage: true });

    // the share page, opened as a visitor would
    const sharePage = await context.newPage();
    const res = await sharePage.goto(share);
    expectStrictPolicy(res!.headers()["content-security-policy"], "'self'");
    await expect(sharePage.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
    await expect(sharePage.getByTestId("share")).toContainText("csp check");
    await sharePage.close();

    expect(violations).toEqual([]);
    expect(errors).toEqual([]);

    // the 404 page (Chromium logs the document's own 404 as a console error)
    const missing = await page.goto("/no/such/page");
    expect(missing!.status()).toBe(404);
    expectStrictPolicy(missing!.headers()["content-security-policy"], "'self'");
    await expect(page.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
    await expect(page.getByRole("heading", { level: 1 })).toBeVisible();
    expect(violations).toEqual([]);
    expect(errors).toEqual(["Failed to load resource: the server responded with a status of 404 (Not Found)"]);

    await expectWatcherHearsAViolation(page, violations);
  } finally {
    await context.close();
  }
});

test("CSP: the embed runs framed by the second origin without a violation", async ({ browser }) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const { violations, errors } = await watchPolicy(context);
  try {
    const page = await context.newPage();
    const embedResponse = page.waitForResponse((r) => r.url() === `${STUDIO}/embed`);
    await page.goto(`${HOST}/`);
    expectStrictPolicy((await embedResponse).headers()["content-security-policy"], `'self' ${HOST}`);
    const frame = page.frameLocator("#studio");
    await expect(frame.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 60_000 });
    await frame.locator("#embed-prompt").fill("a paper boat, csp check");
    await frame.locator("#embed-ratio").selectOption("1024x1024");
    await frame.locator("#embed-submit").click();
    await expect(frame.getByTestId("result-image")).toBeVisible();
    await expect(page.locator("#messages li[data-type='zimage:done']")).toHaveCount(1);
    expect(violations).toEqual([]);
    expect(errors).toEqual([]);

    // the watcher hears the framed page (another origin, another renderer process)
    const embedFrame = page.frames().find((f) => f.url() === `${STUDIO}/embed`)!;
    await expectWatcherHearsAViolation(embedFrame, violations);
  } finally {
    await context.close();
  }
});

test("CSP: the service worker's offline shell runs without a violation", async ({ browser }) => {
  const context = await browser.newContext({ baseURL: STUDIO, viewport: { width: 1280, height: 900 } });
  const { violations, errors } = await watchPolicy(context);
  try {
    const page = await context.newPage();
    await gotoHydrated(page, "/");
    await page.evaluate(() => navigator.serviceWorker.ready);
    // once the worker controls the page, "/" and the bundle are in its cache
    await page.reload();
    await page.waitForLoadState("networkidle");
    expect(await page.evaluate(() => !!navigator.serviceWorker.controller)).toBe(true);
    await context.setOffline(true);
    await page.reload();
    await expect(page.locator("h1")).toContainText("Z-Image Turbo Studio");
    // the cached page keeps its headers: the same policy, and its hashes still match the scripts
    await expect(page.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
    expect(violations).toEqual([]);
    // offline, the socket and the server functions fail: those errors are expected here
    expect(errors.filter((e) => !/ERR_INTERNET_DISCONNECTED|WebSocket|Failed to fetch|net::/.test(e))).toEqual([]);
    await expectWatcherHearsAViolation(page, violations);
    await context.setOffline(false);
  } finally {
    await context.close();
  }
});
