import { test, expect, Page } from "@playwright/test";
import { gotoHydrated, shot, watchConsole, watchSocket } from "./helpers";

/** Sets a range input's value the way a user's drag does (an input event). */
async function setRange(page: Page, selector: string, value: string) {
  await page.locator(selector).evaluate((el: HTMLInputElement, v) => {
    el.value = v;
    el.dispatchEvent(new Event("input", { bubbles: true }));
  }, value);
}

// The tiny model's enhancer writes gibberish: the checks are on the mechanics (streaming into the
// prompt box, revert, the history keeping both prompts), not the words.
test("enhance: the new prompt streams into the box, reverts, and makes the image; both prompts are kept", async ({ page }) => {
  const errors = watchConsole(page);
  const events = watchSocket(page);
  await gotoHydrated(page, "/");
  const box = page.locator("#gen-prompt");
  const mine = "a small red boat on a calm lake";
  await box.fill(mine);

  // record every value the page puts into the box while the text is written
  await box.evaluate((el: HTMLTextAreaElement) => {
    const seen: string[] = [el.value];
    (window as any).__promptValues = seen;
    const native = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value")!;
    Object.defineProperty(el, "value", {
      configurable: true,
      get() {
        return native.get!.call(this);
      },
      set(v: string) {
        if (seen[seen.length - 1] !== v) seen.push(v);
        native.set!.call(this, v);
      },
    });
  });
  await page.getByTestId("gen-enhance").click();
  await expect(page.getByTestId("gen-enhance-revert")).toBeVisible();
  await expect(page.getByTestId("gen-enhance-status")).toContainText("Enhanced");
  const done = events.find((e) => e.type === "enhance_done");
  expect(done).toBeTruthy();
  const enhanced: string = done.result.text;
  expect(enhanced.length).toBeGreaterThan(0);
  await expect(box).toHaveValue(enhanced);
  // it came as typed events: queued or started, then text deltas of the same job
  const mineEvents = events.filter((e) => e.job_id === done.job_id).map((e) => e.type);
  expect(mineEvents).toContain("enhance_text");
  expect(mineEvents.some((t) => t === "queued" || t === "enhance_started")).toBe(true);
  // the box showed the text growing (more than the original and the final value)
  const values: string[] = await page.evaluate(() => (window as any).__promptValues);
  expect(values[0]).toBe(mine);
  expect(values[values.length - 1]).toBe(enhanced);
  const written = events.filter((e) => e.job_id === done.job_id && e.type === "enhance_text").map((e) => e.delta).join("");
  expect(written.trim()).toBe(enhanced);
  // one value per text delta: the box grew as the text was written
  const deltas = events.filter((e) => e.job_id === done.job_id && e.type === "enhance_text" && e.delta !== "");
  expect(values.length).toBeGreaterThanOrEqual(Math.min(deltas.length, 3));
  for (let i = 2; i < values.length; i++) expect(values[i].startsWith(values[i - 1].trimEnd())).toBe(true);
  await page.screenshot({ path: shot("enhance-done"), fullPage: true });

  // Revert gives the written prompt back
  await page.getByTestId("gen-enhance-revert").click();
  await expect(box).toHaveValue(mine);
  await expect(page.getByTestId("gen-enhance-revert")).toBeHidden();

  // enhance again, keep it, and generate with it
  const before = events.length;
  await page.getByTestId("gen-enhance").click();
  await expect(page.getByTestId("gen-enhance-status")).toContainText("Enhanced");
  const again = events.slice(before).find((e) => e.type === "enhance_done");
  await expect(box).toHaveValue(again.result.text);
  await setRange(page, "#gen-steps", "4");
  await page.locator("#gen-submit").click();
  await expect(page.getByTestId("result-image")).toBeVisible();
  const image = events.find((e) => e.type === "done");
  expect(image.result.prompt).toBe(again.result.text.trim());
  expect(image.result.written_prompt).toBe(mine);

  // the history shows both
  await page.locator("#tab-history").click();
  await page.getByTestId("history-item").first().click();
  await expect(page.getByTestId("history-settings")).toContainText(mine);
  await expect(page.getByTestId("history-settings")).toContainText("Written prompt");
  expect(errors).toEqual([]);
});
