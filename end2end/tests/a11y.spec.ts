import { test, expect, Browser, BrowserContext, Page, TestInfo } from "@playwright/test";
import * as path from "node:path";
import { axeViolations, gotoHydrated, shot } from "./helpers";

// axe-core audits of every page and state at a desktop and a phone width, in the light and the
// dark theme (the system's, as `prefers-color-scheme` emulation): 0 violations of WCAG 2.1 A/AA
// and axe's best practices. One context per width; the themes switch within it.

const FIXTURE = path.resolve(__dirname, "..", "fixtures", "photo-640x480.png");
const WIDTHS = [
  { width: 1366, height: 900 },
  { width: 390, height: 844 },
];
const THEMES = ["light", "dark"] as const;

/** Switches the system theme and waits for the colour transitions it starts to end. */
async function setTheme(page: Page, theme: (typeof THEMES)[number]) {
  await page.emulateMedia({ colorScheme: theme });
  await page.evaluate(() => Promise.all(document.getAnimations().map((a) => a.finished.catch(() => undefined))));
}

/** Audits the page in both themes; each finding is labelled with where it was found. */
async function auditBothThemes(page: Page, where: string, found: string[]) {
  for (const theme of THEMES) {
    await setTheme(page, theme);
    for (const v of await axeViolations(page)) found.push(`[${where}, ${theme}] ${v}`);
  }
}

/** Full-page screenshots of both themes into the report (and end2end/screenshots when `keep`). */
async function shootBothThemes(page: Page, name: string, testInfo: TestInfo, keep: boolean) {
  for (const theme of THEMES) {
    await setTheme(page, theme);
    const file = keep ? shot(`${name}-${theme}`) : testInfo.outputPath(`${name}-${theme}.png`);
    await page.screenshot({ path: file, fullPage: true });
    await testInfo.attach(`${name}-${theme}`, { path: file, contentType: "image/png" });
  }
}

async function newContext(browser: Browser, size: { width: number; height: number }): Promise<BrowserContext> {
  const phone = size.width < 600;
  return browser.newContext({ viewport: size, isMobile: phone, hasTouch: phone });
}

/** Records every text the progress live region takes (a MutationObserver in the page). */
async function recordAnnouncements(page: Page) {
  await page.evaluate(() => {
    const w = window as any;
    w.__said = [];
    const region = document.querySelector("#gen-output [data-testid=announcer]")!;
    new MutationObserver(() => {
      const t = region.textContent ?? "";
      if (t && w.__said[w.__said.length - 1] !== t) w.__said.push(t);
    }).observe(region, { subtree: true, childList: true, characterData: true });
  });
  return () => page.evaluate(() => (window as any).__said as string[]);
}

for (const size of WIDTHS) {
  test(`axe: every page and state at ${size.width} px, light and dark, has no violations`, async ({ browser }, testInfo) => {
    const context = await newContext(browser, size);
    const page = await context.newPage();
    const found: string[] = [];
    const tag = `${size.width}`;

    // Generate, empty and with a result (the live region announces the progress meanwhile)
    const steps: number[] = [];
    page.on("websocket", (ws) => ws.on("framereceived", (f) => {
      try {
        const e = JSON.parse(String(f.payload));
        if (e.type === "step") steps.push(e.step);
      } catch {}
    }));
    await gotoHydrated(page, "/");
    await auditBothThemes(page, "generate", found);
    await page.locator("#gen-prompt").fill(`accessibility audit at ${tag} px, a quiet harbour`);
    await page.locator("#gen-steps").fill("5");
    const said = await recordAnnouncements(page);
    await page.locator("#gen-submit").click();
    await expect(page.getByTestId("result-image")).toBeVisible();
    await auditBothThemes(page, "generate: result", found);
    await shootBothThemes(page, `a11y-generate-${tag}`, testInfo, true);
    // progress was announced with the step and the time left, and not on every tick
    const announced = await said();
    expect(announced.some((t) => /^Step \d+ of 5, about .+ left\.$/.test(t)), announced.join(" | ")).toBe(true);
    expect(announced[announced.length - 1]).toMatch(/^Image ready: 1024×1024, seed \d+\.$/);
    // each stage once; of the steps, only one every few seconds
    const stepsSaid = announced.filter((t) => t.startsWith("Step "));
    expect(steps.length).toBeGreaterThanOrEqual(5);
    expect(stepsSaid.length).toBeLessThan(steps.length);
    expect(announced.length - stepsSaid.length).toBeLessThanOrEqual(4);

    // Transform with an uploaded image
    await page.locator("#tab-transform").click();
    await page.locator("#tr-file").setInputFiles(FIXTURE);
    await expect(page.getByTestId("input-preview")).toBeVisible();
    await auditBothThemes(page, "transform: upload", found);

    // History: the list, an opened image, the delete confirmation
    await page.locator("#tab-history").click();
    await page.locator("#history-search").fill(`accessibility audit at ${tag} px`);
    await page.locator("#history-search-go").click();
    await expect(page.getByTestId("history-item")).toHaveCount(1);
    await auditBothThemes(page, "history", found);
    await page.getByTestId("history-item").click();
    await expect(page.getByTestId("history-detail")).toBeVisible();
    await auditBothThemes(page, "history: open image", found);
    await shootBothThemes(page, `a11y-history-${tag}`, testInfo, false);
    await page.getByTestId("history-delete").click();
    await expect(page.getByTestId("history-confirm")).toBeVisible();
    await auditBothThemes(page, "history: delete confirmation", found);
    const share = await page.locator(".history-detail .share-url").inputValue();

    // a share page, the embed page, the 404
    await gotoHydrated(page, share);
    await auditBothThemes(page, "share page", found);
    await gotoHydrated(page, "/embed");
    await auditBothThemes(page, "embed", found);
    await page.goto("/no/such/page");
    await expect(page.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
    await auditBothThemes(page, "404", found);

    // the offline shell: the studio from the service worker's cache, without the network
    await gotoHydrated(page, "/");
    await page.evaluate(() => navigator.serviceWorker.ready.then(() => undefined));
    await page.reload();
    await page.waitForLoadState("networkidle");
    await context.setOffline(true);
    await page.reload();
    await expect(page.locator("h1")).toContainText("Z-Image Turbo Studio");
    await expect(page.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
    await expect(page.getByTestId("reconnecting")).toBeVisible();
    await auditBothThemes(page, "offline shell", found);
    await context.setOffline(false);

    expect(found).toEqual([]);
    await context.close();
  });
}

test("axe: the audit finds a missing label, a missing alt text and low contrast put into the page", async ({ page }) => {
  await gotoHydrated(page, "/");
  expect(await axeViolations(page)).toEqual([]);
  await page.evaluate(() => {
    const img = document.createElement("img");
    img.src = "/icons/icon-192.png";
    const input = document.createElement("input");
    input.type = "text";
    const faint = document.createElement("p");
    faint.textContent = "faint text";
    faint.style.color = "#b0b8c4"; // CSSOM, not a style attribute: the CSP allows it
    const card = document.querySelector(".controls")!;
    card.append(img, input, faint);
  });
  const violations = await axeViolations(page);
  const rules = new Set(violations.map((v) => v.split(" ")[0]));
  expect([...rules].sort()).toEqual(["color-contrast", "image-alt", "label"]);
});
