import { test, expect } from "@playwright/test";
import * as path from "node:path";
import { gotoHydrated, pngSize, pngText, recordPreviews, shot, watchConsole, watchSocket } from "./helpers";

const FIXTURE = path.resolve(__dirname, "..", "fixtures", "photo-640x480.png");

test("generate: example prompt, 16:9 size, live progress and previews, PNG of the chosen size", async ({ page, request }) => {
  const errors = watchConsole(page);
  const events = watchSocket(page);
  await gotoHydrated(page, "/");

  await expect(page.getByTestId("tiny-banner")).toContainText("random weights");
  await expect(page.locator("#gen-ratio optgroup")).toHaveCount(3);
  await expect(page.locator("#gen-ratio option")).toHaveCount(18);
  await expect(page.locator("#gen-style option")).toHaveCount(10);
  await expect(page.locator(".chips .chip")).toHaveCount(8);

  await page.locator(".chip", { hasText: "Lighthouse" }).click();
  await expect(page.locator("#gen-prompt")).toHaveValue(/lighthouse/);
  await page.selectOption("#gen-style", "cinematic");
  await page.selectOption("#gen-ratio", "1344x768");
  const countPreviews = await recordPreviews(page);

  await page.locator("#gen-submit").click();
  await expect(page.getByTestId("preview")).toBeVisible();
  await expect(page.getByTestId("step-text")).toContainText(/Step \d+\/8/);
  await page.screenshot({ path: shot("generate-progress"), fullPage: true });
  await expect(page.getByTestId("result-image")).toBeVisible();
  await page.screenshot({ path: shot("generate-done"), fullPage: true });

  // the live preview changed while it ran
  expect(await countPreviews()).toBeGreaterThan(1);
  // the websocket carried the typed events
  // (an idle worker starts the job at once, so the first event seen may already be "started")
  const types = events.map((e) => e.type);
  expect(types.some((t) => t === "queued" || t === "started")).toBe(true);
  expect(types.filter((t) => t === "step").length).toBeGreaterThanOrEqual(2);
  const done = events.find((e) => e.type === "done");
  expect(done.result.width).toBe(1344);
  const step = events.find((e) => e.type === "step");
  expect(step.total).toBe(8);
  expect(step.preview).toMatch(/^data:image\/jpeg;base64,/);
  expect(typeof step.eta_ms).toBe("number");

  // the PNG has the chosen ratio's size and its parameters
  const src = await page.getByTestId("result-image").getAttribute("src");
  const png = Buffer.from(await (await request.get(src!)).body());
  expect(pngSize(png)).toEqual({ width: 1344, height: 768 });
  const seed = (await page.getByTestId("result-seed").textContent())!.trim();
  const params = pngText(png, "parameters")!;
  expect(params).toContain("lighthouse");
  expect(params).toContain("cinematic film still");
  expect(params).toContain(`Seed: ${seed}`);
  await expect(page.getByTestId("timings")).toContainText("Total");
  await expect(page.getByTestId("download")).toHaveAttribute("download", new RegExp(`zimage-${seed}-1344x768\\.png`));
  // the used seed is put in the seed field for reproduction
  await expect(page.locator("#gen-seed")).toHaveValue(seed);
  // copy buttons put the seed and the share link on the clipboard
  await page.context().grantPermissions(["clipboard-read", "clipboard-write"]);
  await page.getByTestId("copy-seed").click();
  await expect(page.getByTestId("copy-seed")).toHaveText("Copied ✓");
  expect(await page.evaluate(() => navigator.clipboard.readText())).toBe(seed);
  await page.getByTestId("copy-share").click();
  expect(await page.evaluate(() => navigator.clipboard.readText())).toMatch(/\/share\/[0-9a-f]{32}$/);

  // share link opens the image later
  const share = await page.getByTestId("share-url").inputValue();
  expect(share).toMatch(/\/share\/[0-9a-f]{32}$/);
  const sharePage = await page.context().newPage();
  await sharePage.goto(share);
  await expect(sharePage.getByTestId("share")).toContainText(`seed ${seed}`);
  await expect(sharePage.locator(".share-card img")).toHaveAttribute("src", src!);
  await sharePage.screenshot({ path: shot("share-page"), fullPage: true });
  await sharePage.close();

  expect(errors).toEqual([]);
});

test("generate: Ctrl+Enter submits with a fixed seed; the websocket reconnects and a reload resumes the job", async ({ page }) => {
  const errors = watchConsole(page, [/WebSocket/]);
  await gotoHydrated(page, "/");
  await page.locator("#gen-seed-random").uncheck();
  await page.locator("#gen-seed").fill("1234");
  await page.selectOption("#gen-ratio", "1536x640");
  await page.locator("#gen-prompt").fill("a red fox in fresh snow");
  await page.locator("#gen-prompt").press("Control+Enter");
  await expect(page.getByTestId("running")).toBeVisible();
  // drop the socket: the client reconnects, re-watches the job and still gets its result
  await page.evaluate(() => (window as any).__zimageDropSocket());
  await expect(page.getByTestId("step-text")).toContainText(/Step \d+\/8/);
  // a reload mid-run picks the job up again (its ticket is kept in sessionStorage)
  await page.reload();
  await expect(page.locator("body[data-hydrated=true]")).toBeAttached();
  await expect(page.getByTestId("result-image")).toBeVisible();
  await expect(page.getByTestId("result-seed")).toHaveText("1234");
  await expect(page.getByTestId("reconnecting")).toHaveCount(0);
  expect(errors).toEqual([]);
});

test("transform: upload by picker, size shown, strength, result at the resized size", async ({ page, request }) => {
  const errors = watchConsole(page);
  await gotoHydrated(page, "/");
  await page.locator("#tab-transform").click();
  await page.locator("#tr-file").setInputFiles(FIXTURE);
  await expect(page.getByTestId("input-size")).toHaveText("Input 640×480 → will run at 688×512");
  await expect(page.getByTestId("input-preview")).toBeVisible();
  await page.locator("#tr-prompt").fill("a watercolor harbor at dawn");
  await page.selectOption("#tr-style", "watercolor");
  await page.locator("#tr-strength").fill("0.75");
  await expect(page.locator("label", { hasText: "Strength" }).locator("output")).toHaveText("0.75");
  await page.locator("#tr-submit").click();
  await expect(page.locator("#tr-output").getByTestId("result-image")).toBeVisible();
  await page.screenshot({ path: shot("transform-done"), fullPage: true });
  const src = await page.locator("#tr-output").getByTestId("result-image").getAttribute("src");
  const png = Buffer.from(await (await request.get(src!)).body());
  expect(pngSize(png)).toEqual({ width: 688, height: 512 });
  expect(pngText(png, "parameters")).toContain("Denoising strength: 0.75");
  expect(errors).toEqual([]);
});

test("transform: drag and drop and paste upload too", async ({ page }) => {
  await gotoHydrated(page, "/");
  await page.locator("#tab-transform").click();
  const fs = await import("node:fs");
  const b64 = fs.readFileSync(FIXTURE).toString("base64");
  const makeTransfer = (b64: string) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], "photo.png", { type: "image/png" }));
    return dt;
  };
  const dt = await page.evaluateHandle(makeTransfer, b64);
  await page.getByTestId("dropzone").dispatchEvent("drop", { dataTransfer: dt });
  await expect(page.getByTestId("input-size")).toContainText("688×512");
  const first = await page.getByTestId("input-preview").getAttribute("src");
  await page.evaluate(
    ([b64, make]) => {
      const dt = new Function("b64", `return (${make})(b64)`)(b64);
      document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
    },
    [b64, makeTransfer.toString()]
  );
  await expect(page.getByTestId("input-preview")).not.toHaveAttribute("src", first!);
});

test("cancel mid-run stops the job", async ({ page }) => {
  const errors = watchConsole(page);
  const events = watchSocket(page);
  await gotoHydrated(page, "/");
  await page.selectOption("#gen-ratio", "2048x2048");
  await page.locator("#gen-steps").fill("16");
  await page.locator("#gen-prompt").fill("a very slow picture");
  await page.locator("#gen-submit").click();
  await expect(page.getByTestId("step-text")).toContainText(/Step \d+\/16/);
  await page.getByTestId("cancel").click();
  await expect(page.getByTestId("cancelled")).toBeVisible();
  await page.screenshot({ path: shot("cancelled"), fullPage: true });
  const jobId = events.find((e) => e.type === "step").job_id;
  const steps = events.filter((e) => e.type === "step" && e.job_id === jobId).map((e) => e.step);
  expect(Math.max(...steps)).toBeLessThan(16);
  expect(events.some((e) => e.type === "done" && e.job_id === jobId)).toBe(false);
  await expect(page.locator("#gen-submit")).toBeEnabled();
  expect(errors).toEqual([]);
});

test("invalid input shows the server's reason", async ({ page, request }) => {
  // the browser logs failed (4xx) requests as console errors; those are expected here
  const errors = watchConsole(page, [/status of 4\d\d/]);
  await gotoHydrated(page, "/");
  // empty prompt: refused by the server, its reason shown
  await page.locator("#gen-submit").click();
  await expect(page.getByTestId("error")).toHaveText("Please enter a prompt.");
  // out-of-range seed
  await page.locator("#gen-prompt").fill("a cat");
  await page.locator("#gen-seed-random").uncheck();
  await page.locator("#gen-seed").fill("99999999999");
  await page.locator("#gen-submit").click();
  await expect(page.getByTestId("error")).toContainText("The seed must be between 0 and 4294967295");
  await page.screenshot({ path: shot("invalid-input"), fullPage: true });

  // a non-image upload
  await page.locator("#tab-transform").click();
  await page.locator("#tr-file").setInputFiles({ name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("hello") });
  await expect(page.getByTestId("upload-error")).toContainText("PNG, JPEG or WebP");
  // too large: refused before upload
  await page.locator("#tr-file").setInputFiles({ name: "huge.png", mimeType: "image/png", buffer: Buffer.alloc(21 * 1024 * 1024) });
  await expect(page.getByTestId("upload-error")).toContainText("too large");
  // transform without an image
  await page.locator("#tr-prompt").fill("x");
  await page.locator("#tr-submit").click();
  await expect(page.locator("#tr-output").getByTestId("error")).toContainText("upload an image first");

  // the API checks everything whatever the UI allows: status + JSON reason
  const base = { prompt: "a cat", style: "none", steps: 8, seed: null, kind: { mode: "generate", width: 1024, height: 1024 } };
  const bad = async (req: object) => {
    const r = await request.post("/api/submit_job", { data: { req } });
    return { status: r.status(), body: await r.json() };
  };
  expect(await bad({ ...base, steps: 99 })).toEqual({
    status: 400,
    body: { kind: "invalid_input", reason: "Steps must be between 4 and 16 (got 99)." },
  });
  expect((await bad({ ...base, kind: { mode: "generate", width: 1000, height: 1000 } })).body.reason).toContain("not one of the 18");
  expect((await bad({ ...base, prompt: "x".repeat(2001) })).body.reason).toContain("too long");
  expect((await bad({ ...base, kind: { mode: "transform", upload_id: "0".repeat(32), strength: 2 } })).body.reason).toContain("Strength");
  expect((await bad({ ...base, kind: { mode: "transform", upload_id: "0".repeat(32), strength: 0.5 } })).status).toBe(404);
  expect(errors).toEqual([]);
});

test("queue: FIFO positions, full queue refused with a clear message, queued and running jobs cancelled", async ({ request }) => {
  const req = (prompt: string) => ({
    req: { prompt, style: "none", steps: 16, seed: 1, kind: { mode: "generate", width: 2048, height: 2048 } },
  });
  const submit = async (p: string) => {
    const r = await request.post("/api/submit_job", { data: req(p) });
    return { status: r.status(), body: await r.json() };
  };
  const a = await submit("a");
  expect(a.status).toBe(200);
  await new Promise((r) => setTimeout(r, 1000)); // the worker takes it at once
  // capacity 2: two wait, the next is refused
  const b = await submit("b");
  const c = await submit("c");
  expect([b.body.position, c.body.position]).toEqual([1, 2]);
  const d = await submit("d");
  expect(d.status).toBe(503);
  expect(d.body).toEqual({ kind: "queue_full", reason: "The queue is full (2 jobs waiting). Please try again in a minute." });
  for (const t of [c, b, a]) {
    const r = await request.post("/api/cancel_job", { data: { job_id: t.body.job_id } });
    expect(r.status()).toBe(200);
  }
  const unknown = await request.post("/api/cancel_job", { data: { job_id: "f".repeat(32) } });
  expect(unknown.status()).toBe(404);
});

test("queue in the UI: a second visitor sees their place in line, then moves up when the first cancels", async ({ browser }) => {
  const ctxA = await browser.newContext();
  const ctxB = await browser.newContext();
  const a = await ctxA.newPage();
  const b = await ctxB.newPage();
  await gotoHydrated(a, "/");
  await gotoHydrated(b, "/");
  await a.selectOption("#gen-ratio", "2048x2048");
  await a.locator("#gen-steps").fill("16");
  await a.locator("#gen-prompt").fill("first visitor, slow picture");
  await a.locator("#gen-submit").click();
  await expect(a.getByTestId("running")).toBeVisible();

  await b.locator("#gen-prompt").fill("second visitor");
  await b.locator("#gen-submit").click();
  await expect(b.getByTestId("queued")).toContainText("you are next");
  await b.screenshot({ path: shot("queue-position"), fullPage: true });
  // cancelling a queued job works from the UI too; submit again and let the first one go
  await b.getByTestId("cancel").click();
  await expect(b.getByTestId("cancelled")).toBeVisible();
  await b.locator("#gen-submit").click();
  await expect(b.getByTestId("queued")).toBeVisible();
  await a.getByTestId("cancel").click();
  await expect(a.getByTestId("cancelled")).toBeVisible();
  await expect(b.getByTestId("running")).toBeVisible();
  await b.getByTestId("cancel").click();
  await expect(b.getByTestId("cancelled")).toBeVisible();
  await ctxA.close();
  await ctxB.close();
});
