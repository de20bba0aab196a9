import { test, expect, Page } from "@playwright/test";
import { gotoHydrated } from "./helpers";

// Small screens (no sideways scroll from 320 px, 44 px touch targets), the keyboard (every
// control reachable with a visible focus ring, arrow keys in the tab bar, Escape), the theme
// toggle, reduced motion, and generated images shown untinted in the dark theme.

const PROMPT = "keyboard and layout check, a gull on a post";
let sharePath = "";

test.beforeAll(async ({ request }) => {
  // one image in the history (made through the HTTP API, like a script would)
  const r = await request.post("/api/generate", {
    data: { prompt: PROMPT, steps: 4, seed: 5, kind: { mode: "generate", width: 1024, height: 1024 } },
    headers: { accept: "application/json" },
    timeout: 240_000,
  });
  expect(r.status()).toBe(200);
  sharePath = (await r.json()).share_url;
});

/** Opens the History tab and the image made above. */
async function openHistoryItem(page: Page) {
  await page.locator("#tab-history").click();
  await page.locator("#history-search").fill(PROMPT);
  await page.locator("#history-search-go").click();
  // (a retried file makes the image again: the newest is first)
  await expect(page.getByTestId("history-item").first()).toBeVisible();
  await page.getByTestId("history-item").first().click();
  await expect(page.getByTestId("history-detail")).toBeVisible();
}

/** The page is no wider than the window (nothing scrolls sideways). */
async function expectNoSidewaysScroll(page: Page, where: string) {
  const m = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    body: document.body.scrollWidth,
    inner: window.innerWidth,
  }));
  expect(Math.max(m.scroll, m.body), `${where}: scrollWidth ${m.scroll}/${m.body} > innerWidth ${m.inner}`).toBeLessThanOrEqual(m.inner);
}

/** Every visible control (buttons, fields, the tab bar, file pickers' labels) is at least 44x44 px. */
async function expectTouchTargets(page: Page, where: string) {
  const small = await page.evaluate(() => {
    const sel =
      "button, a.btn, .footer a, .powered a, select, textarea, summary, label.btn, label.check, [role=tab], " +
      "input:not([type=checkbox]):not([type=file]):not(.visually-hidden)";
    return [...document.querySelectorAll<HTMLElement>(sel)]
      .filter((e) => e.offsetParent !== null || getComputedStyle(e).position === "fixed")
      .map((e) => ({ e, r: e.getBoundingClientRect() }))
      .filter(({ r }) => r.width > 0 && (r.width < 44 || r.height < 44))
      .map(({ e, r }) => `${e.tagName.toLowerCase()}#${e.id}.${e.className} "${(e.textContent ?? "").trim().slice(0, 20)}" ${r.width.toFixed(0)}x${r.height.toFixed(0)}`);
  });
  expect(small, `${where}: controls smaller than 44x44 px`).toEqual([]);
}

for (const width of [320, 390]) {
  test(`small screens: no sideways scroll and 44 px touch targets at ${width} px`, async ({ browser }) => {
    const context = await browser.newContext({ viewport: { width, height: 760 }, isMobile: true, hasTouch: true });
    const page = await context.newPage();
    await gotoHydrated(page, "/");
    // the three tabs fit side by side
    const boxes = await Promise.all(["#tab-generate", "#tab-transform", "#tab-history"].map((s) => page.locator(s).boundingBox()));
    for (const b of boxes) expect(b!.x + b!.width).toBeLessThanOrEqual(width);
    expect(boxes[0]!.y).toBe(boxes[2]!.y);
    await expectNoSidewaysScroll(page, "generate");
    await expectTouchTargets(page, "generate");
    await page.locator("#tab-transform").click();
    await expectNoSidewaysScroll(page, "transform");
    await expectTouchTargets(page, "transform");
    await openHistoryItem(page);
    await expectNoSidewaysScroll(page, "history: open image");
    await expectTouchTargets(page, "history: open image");
    // the history grid and the opened image use the width
    const grid = await page.locator(".thumbs").boundingBox();
    const img = await page.getByTestId("history-image").boundingBox();
    expect(img!.width).toBeGreaterThan(width * 0.8);
    expect(await page.locator(".thumbs").evaluate((g) => getComputedStyle(g).gridTemplateColumns.split(" ").length)).toBeGreaterThanOrEqual(2);
    expect(grid!.width).toBeGreaterThan(width * 0.8);
    for (const [where, url] of [["share page", sharePath], ["embed", "/embed"], ["404", "/no/such/page"]]) {
      await page.goto(url);
      await expect(page.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
      await expectNoSidewaysScroll(page, where);
      await expectTouchTargets(page, where);
    }
    await context.close();
  });
}

test("keyboard: every control is reached with Tab and shows a focus ring; arrows move between tabs", async ({ page }) => {
  await gotoHydrated(page, "/");
  const reached = new Set<string>();
  const noRing: string[] = [];
  for (let i = 0; i < 60; i++) {
    await page.keyboard.press("Tab");
    const f = await page.evaluate(() => {
      const e = document.activeElement as HTMLElement | null;
      if (!e || e === document.body) return null;
      // a visually hidden file input shows its ring on its label
      const ringOn = e.classList.contains("visually-hidden") ? (e.closest("label") as HTMLElement) : e;
      const s = getComputedStyle(ringOn);
      return { key: e.id || e.getAttribute("data-testid") || e.textContent?.trim() || e.tagName, ring: s.outlineStyle !== "none" && parseFloat(s.outlineWidth) >= 2 };
    });
    if (!f) continue;
    if (reached.has(f.key)) continue;
    reached.add(f.key);
    if (!f.ring) noRing.push(f.key);
  }
  for (const id of ["theme-toggle", "tab-generate", "gen-prompt", "Negative prompt", "gen-restore", "Lighthouse", "gen-style", "gen-ratio", "gen-steps", "gen-seed-random", "gen-count", "gen-submit", "embed"]) {
    expect([...reached], `${id} reached by Tab`).toContain(id);
  }
  // one tab stop for the tab bar: the other tabs are reached with the arrow keys
  expect([...reached]).not.toContain("tab-transform");
  expect(noRing).toEqual([]);

  await page.locator("#tab-generate").focus();
  await page.keyboard.press("ArrowRight");
  await expect(page.locator("#tab-transform")).toBeFocused();
  await expect(page.locator("#tab-transform")).toHaveAttribute("aria-selected", "true");
  await expect(page.locator("#panel-transform")).toBeVisible();
  await expect(page.locator("#panel-generate")).toBeHidden();
  await page.keyboard.press("End");
  await expect(page.locator("#tab-history")).toBeFocused();
  await expect(page.locator("#panel-history")).toBeVisible();
  await page.keyboard.press("ArrowRight");
  await expect(page.locator("#tab-generate")).toBeFocused();
  await page.keyboard.press("ArrowLeft");
  await expect(page.locator("#tab-history")).toBeFocused();
  await page.keyboard.press("Home");
  await expect(page.locator("#tab-generate")).toHaveAttribute("aria-selected", "true");
});

test("keyboard: the history image opens with Enter, Escape leaves the delete confirmation and closes it", async ({ page }) => {
  await gotoHydrated(page, "/");
  await page.locator("#tab-history").click();
  await page.locator("#history-search").fill(PROMPT);
  await page.keyboard.press("Enter");
  const thumb = page.getByTestId("history-item").first();
  await expect(thumb).toBeVisible();
  const items = await page.getByTestId("history-item").count();
  await thumb.focus();
  await page.keyboard.press("Enter");
  const detail = page.getByTestId("history-detail");
  await expect(detail).toBeVisible();
  // the opened image takes the focus
  await expect(detail.locator("h2")).toBeFocused();

  // Delete… asks first; the focus goes to "Keep", Escape keeps the image
  await page.getByTestId("history-delete").focus();
  await page.keyboard.press("Enter");
  await expect(page.getByTestId("history-confirm")).toBeVisible();
  await expect(page.getByTestId("history-delete-no")).toBeFocused();
  await page.keyboard.press("Escape");
  await expect(page.getByTestId("history-confirm")).toBeHidden();
  await expect(detail).toBeVisible();
  await expect(page.getByTestId("history-delete")).toBeFocused();

  // Escape closes the image and gives the focus back to its thumbnail
  await page.keyboard.press("Escape");
  await expect(detail).toBeHidden();
  await expect(thumb).toBeFocused();
  await expect(page.getByTestId("history-item")).toHaveCount(items);
});

test("theme: follows the system, the toggle's choice is remembered by the browser and applied before the first paint", async ({ browser }) => {
  const context = await browser.newContext({ colorScheme: "light" });
  const page = await context.newPage();
  const cardBg = () => page.locator(".controls").first().evaluate((e) => getComputedStyle(e).backgroundColor);
  await gotoHydrated(page, "/");
  const toggle = page.locator("#theme-toggle");
  await expect(toggle).toHaveAttribute("aria-pressed", "false");
  expect(await cardBg()).toBe("rgb(255, 255, 255)");
  // the system turns dark: so does the page
  await page.emulateMedia({ colorScheme: "dark" });
  const dark = await cardBg();
  expect(dark).toBe("rgb(17, 24, 39)");
  // back to a light system; the toggle chooses dark
  await page.emulateMedia({ colorScheme: "light" });
  await toggle.click();
  await expect(toggle).toHaveAttribute("aria-pressed", "true");
  await expect(page.locator("html")).toHaveAttribute("data-theme", "dark");
  expect(await cardBg()).toBe(dark);
  expect(await page.evaluate(() => localStorage.getItem("zimage.theme"))).toBe("dark");

  // a new page of this browser is dark from its first paint (before the app runs)
  const second = await context.newPage();
  let themeAtFirstScript = "";
  await second.exposeFunction("__report", (t: string) => (themeAtFirstScript = t));
  await second.addInitScript(() => {
    document.addEventListener("DOMContentLoaded", () => (window as any).__report(document.documentElement.getAttribute("data-theme") ?? ""));
  });
  await gotoHydrated(second, "/");
  expect(themeAtFirstScript).toBe("dark");
  await expect(second.locator("#theme-toggle")).toHaveAttribute("aria-pressed", "true");
  // and the choice wins over a dark system the other way round too
  await second.locator("#theme-toggle").click();
  await second.emulateMedia({ colorScheme: "dark" });
  expect(await second.locator(".controls").first().evaluate((e) => getComputedStyle(e).backgroundColor)).toBe("rgb(255, 255, 255)");
  expect(await second.evaluate(() => localStorage.getItem("zimage.theme"))).toBe("light");
  await context.close();
});

test("dark theme: generated images are shown untinted; reduced motion turns transitions off", async ({ browser }) => {
  const context = await browser.newContext({ colorScheme: "dark", reducedMotion: "reduce" });
  const page = await context.newPage();
  await gotoHydrated(page, "/");
  expect(await page.locator("#tab-generate").evaluate((e) => getComputedStyle(e).transitionDuration)).toMatch(/^0s(, 0s)*$/);
  await openHistoryItem(page);
  for (const img of [page.getByTestId("history-item").locator("img"), page.getByTestId("history-image")]) {
    // nothing on the image or around it changes its pixels: no filter, blend or transparency
    const tints = await img.evaluate((e) => {
      const out: string[] = [];
      for (let n: Element | null = e; n; n = n.parentElement) {
        const s = getComputedStyle(n);
        if (s.filter !== "none") out.push(`${n.tagName} filter ${s.filter}`);
        if (s.mixBlendMode !== "normal") out.push(`${n.tagName} blend ${s.mixBlendMode}`);
        if (s.opacity !== "1") out.push(`${n.tagName} opacity ${s.opacity}`);
        if (s.backdropFilter && s.backdropFilter !== "none") out.push(`${n.tagName} backdrop ${s.backdropFilter}`);
      }
      return out;
    });
    expect(tints).toEqual([]);
  }
  await context.close();

  const moving = await browser.newContext({ reducedMotion: "no-preference" });
  const p2 = await moving.newPage();
  await gotoHydrated(p2, "/");
  expect(await p2.locator("#tab-generate").evaluate((e) => getComputedStyle(e).transitionDuration)).not.toMatch(/^0s(, 0s)*$/);
  await moving.close();
});
