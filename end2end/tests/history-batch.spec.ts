import { test, expect, Page } from "@playwright/test";
import * as fs from "node:fs";
import * as path from "node:path";
import { gotoHydrated, pngText, pngWithParameters, setRange, shot, watchConsole } from "./helpers";


test("batches: two images with consecutive seeds in a small gallery, image k of n", async ({ page, request }) => {
  const errors = watchConsole(page);
  await gotoHydrated(page, "/");
  await page.locator("#gen-prompt").fill("zebra batch gallery");
  await setRange(page, "#gen-steps", "4");
  await page.locator("#gen-seed-random").uncheck();
  await page.locator("#gen-seed").fill("300");
  await page.selectOption("#gen-count", "2");
  await page.locator("#gen-submit").click();

  await expect(page.getByTestId("batch-status")).toContainText(/Image [12] of 2/);
  await expect(page.getByTestId("gallery-item")).toHaveCount(2);
  const seeds = page.getByTestId("gallery-item").getByTestId("result-seed");
  await expect(seeds).toHaveText(["300", "301"], { timeout: 240_000 });
  await expect(page.getByTestId("batch-status")).toHaveText("2 images done.");
  await page.screenshot({ path: shot("batch-done"), fullPage: true });

  // each image has its own download and share link, and its seed in its PNG
  const items = page.getByTestId("gallery-item");
  for (const [i, seed] of ["300", "301"].entries()) {
    await expect(items.nth(i).getByTestId("download")).toHaveAttribute("download", new RegExp(`zimage-${seed}-`));
    await expect(items.nth(i).getByTestId("share-url")).toHaveValue(/\/share\/[0-9a-f]{32}$/);
    const src = await items.nth(i).getByTestId("result-image").getAttribute("src");
    const png = Buffer.from(await (await request.get(src!)).body());
    expect(pngText(png, "parameters")).toContain(`Seed: ${seed},`);
  }
  expect(errors).toEqual([]);
});

test("history: search, open an image, use its settings, delete it", async ({ page, request }) => {
  const errors = watchConsole(page);
  // two images made through the HTTP API (they are in the history like the studio's)
  for (const [word, seed] of [["first", 11], ["second", 12]] as const) {
    const r = await request.post("/api/generate", {
      data: { prompt: `walrus history ${word}`, style: "anime", steps: 5, seed, kind: { mode: "generate", width: 1024, height: 1024 } },
      headers: { accept: "application/json" },
      timeout: 240_000,
    });
    expect(r.status()).toBe(200);
  }
  await gotoHydrated(page, "/");
  await page.locator("#tab-history").click();
  await expect(page.getByTestId("history")).toBeVisible();
  await page.locator("#history-search").fill("walrus");
  await page.locator("#history-search-go").click();
  await expect(page.getByTestId("history-item")).toHaveCount(2);
  await expect(page.getByTestId("history-count")).toHaveText("2 images");
  // thumbnails load
  await expect
    .poll(async () => page.getByTestId("history-item").first().locator("img").evaluate((i: HTMLImageElement) => i.naturalWidth))
    .toBeGreaterThan(0);
  await page.locator("#history-search").fill("walrus sec");
  await page.locator("#history-search-go").click();
  await expect(page.getByTestId("history-item")).toHaveCount(1);
  await page.locator("#history-search").fill("walrus");
  await page.locator("#history-search-go").click();
  await expect(page.getByTestId("history-item")).toHaveCount(2);

  // newest first: "second"
  await page.getByTestId("history-item").first().click();
  const detail = page.getByTestId("history-settings");
  await expect(detail).toContainText("walrus history second");
  await expect(detail).toContainText("12");
  await expect(detail).toContainText("HTTP API");
  await page.screenshot({ path: shot("history"), fullPage: true });
  await page.getByTestId("history-reuse").click();
  await expect(page.locator("#gen-prompt")).toHaveValue("walrus history second");
  await expect(page.locator("#gen-style")).toHaveValue("anime");
  await expect(page.locator("#gen-seed")).toHaveValue("12");
  await expect(page.locator("#gen-seed-random")).not.toBeChecked();

  // delete with a confirmation: the row, the file and the share page go
  await page.locator("#tab-history").click();
  await expect(page.getByTestId("history-item")).toHaveCount(2);
  await page.getByTestId("history-item").first().click();
  const src = await page.getByTestId("history-image").getAttribute("src");
  await page.getByTestId("history-delete").click();
  await expect(page.getByTestId("history-confirm")).toBeVisible();
  await page.getByTestId("history-delete-yes").click();
  await expect(page.getByTestId("history-item")).toHaveCount(1);
  await expect(page.getByTestId("history-count")).toHaveText("1 image");
  expect((await request.get(src!)).status()).toBe(404);
  expect(errors.filter((e) => !/404/.test(e))).toEqual([]);
});

test("restore settings from a PNG: ours fill the form, A1111's say what was not restored", async ({ page }) => {
  const errors = watchConsole(page);
  await gotoHydrated(page, "/");
  const ours =
    "a castle on a hill, oil painting on canvas, visible brushstrokes, rich impasto texture, classical fine art\n" +
    "Negative prompt: lowres\n" +
    "Steps: 6, Sampler: Euler, Schedule type: Simple, CFG scale: 0, Seed: 777, Size: 1344x768, Model: Tongyi-MAI/Z-Image-Turbo";
  await page.locator("#gen-restore").setInputFiles({ name: "castle.png", mimeType: "image/png", buffer: pngWithParameters(ours) });
  await expect(page.getByTestId("restore-note")).toHaveText("Restored: prompt, style, negative prompt, steps, seed, size.");
  await expect(page.locator("#gen-prompt")).toHaveValue("a castle on a hill");
  await expect(page.locator("#gen-negative")).toHaveValue("lowres");
  await expect(page.locator("#gen-style")).toHaveValue("oil_painting");
  await expect(page.locator("#gen-ratio")).toHaveValue("1344x768");
  await expect(page.locator("#gen-steps")).toHaveValue("6");
  await expect(page.locator("#gen-seed")).toHaveValue("777");
  await expect(page.locator("#gen-seed-random")).not.toBeChecked();
  await page.screenshot({ path: shot("png-restore"), fullPage: true });

  const a1111 = "a red bike\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: abc";
  await page.locator("#gen-restore").setInputFiles({ name: "bike.png", mimeType: "image/png", buffer: pngWithParameters(a1111) });
  const note = page.getByTestId("restore-note");
  await expect(note).toContainText("Restored: prompt, seed.");
  await expect(note).toContainText("size 512x512 (not one of the studio's 18 sizes)");
  await expect(note).toContainText("steps 30");
  await expect(page.locator("#gen-prompt")).toHaveValue("a red bike");
  await expect(page.locator("#gen-ratio")).toHaveValue("1344x768"); // kept
  await expect(page.locator("#gen-seed")).toHaveValue("42");

  await page.locator("#gen-restore").setInputFiles({ name: "plain.png", mimeType: "image/png", buffer: fs.readFileSync(path.resolve(__dirname, "..", "fixtures", "photo-640x480.png")) });
  await expect(note).toContainText("holds no generation settings");
  expect(errors).toEqual([]);
});
