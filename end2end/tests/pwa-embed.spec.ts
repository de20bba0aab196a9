import { test, expect, chromium } from "@playwright/test";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { gotoHydrated, shot, watchConsole } from "./helpers";
import { HOST, STUDIO } from "../playwright.config";

test("PWA: manifest, service worker registered, Chromium reports it installable, shell works offline", async ({ request }, testInfo) => {
  // installability is not reported in incognito contexts: use a persistent profile
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "zimage-pwa-"));
  const context = await chromium.launchPersistentContext(profile, {
    ...(testInfo.project.use.launchOptions ?? {}),
    baseURL: STUDIO,
    viewport: { width: 1280, height: 900 },
  });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    const errors = watchConsole(page);
    await gotoHydrated(page, "/");
    const manifest = await (await request.get("/manifest.webmanifest")).json();
    expect(manifest.name).toBe("Z-Image Turbo Studio");
    expect(manifest.display).toBe("standalone");
    expect(manifest.icons.map((i: any) => i.sizes)).toEqual(expect.arrayContaining(["192x192", "512x512"]));

    const scriptURL = await page.evaluate(async () => {
      const reg = await navigator.serviceWorker.ready;
      return reg.active?.scriptURL;
    });
    expect(scriptURL).toBe(`${STUDIO}/sw.js`);

    const cdp = await context.newCDPSession(page);
    const { errors: manifestErrors } = await cdp.send("Page.getAppManifest");
    expect(manifestErrors).toEqual([]);
    await expect
      .poll(async () => (await cdp.send("Page.getInstallabilityErrors")).installabilityErrors, { timeout: 30_000 })
      .toEqual([]);
    await page.screenshot({ path: shot("pwa-installable"), fullPage: false });

    // the cached app shell opens without the network
    await page.reload();
    await page.waitForLoadState("networkidle");
    await context.setOffline(true);
    await page.reload();
    await expect(page.locator("h1")).toContainText("Z-Image Turbo Studio");
    await context.setOffline(false);
    expect(errors.filter((e) => !/ERR_INTERNET_DISCONNECTED|WebSocket/.test(e))).toEqual([]);
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
});

test("embed: works in an iframe on another origin and posts the result to the parent", async ({ page, request }) => {
  // framing rules: /embed allows the host origin, the studio itself only allows itself
  // (the rest of the policy is checked in csp.spec.ts)
  const embed = await request.get("/embed");
  expect(embed.headers()["content-security-policy"]).toMatch(new RegExp(`; frame-ancestors 'self' ${HOST}$`));
  expect(embed.headers()["x-frame-options"]).toBeUndefined();
  const home = await request.get("/");
  expect(home.headers()["content-security-policy"]).toMatch(/; frame-ancestors 'self'$/);
  expect(home.headers()["x-frame-options"]).toBe("SAMEORIGIN");

  await page.goto(`${HOST}/`);
  const frame = page.frameLocator("#studio");
  await expect(frame.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 60_000 });
  await expect(frame.getByTestId("tiny-banner")).toBeVisible();
  await frame.locator("#embed-prompt").fill("a small friendly dragon reading a book");
  await frame.locator("#embed-ratio").selectOption("1216x832");
  await frame.locator("#embed-submit").click();
  await expect(frame.getByTestId("result-image")).toBeVisible();
  const msg = page.locator("#messages li[data-type='zimage:done']");
  await expect(msg).toHaveCount(1);
  const data = JSON.parse((await msg.textContent())!);
  expect(data.imageUrl).toMatch(new RegExp(`^${STUDIO}/images/[0-9a-f]{32}\\.png$`));
  expect(data.width).toBe(1216);
  expect(data.height).toBe(832);
  await page.screenshot({ path: shot("embed-iframe"), fullPage: true });
});

test("phone layout stacks the columns", async ({ browser }) => {
  const ctx = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const page = await ctx.newPage();
  await gotoHydrated(page, "/");
  const controls = await page.locator("#tab-generate").boundingBox();
  const c = await page.locator(".controls").first().boundingBox();
  const o = await page.locator("#gen-output").boundingBox();
  expect(controls).not.toBeNull();
  expect(o!.y).toBeGreaterThan(c!.y + c!.height - 1);
  await page.screenshot({ path: shot("phone"), fullPage: true });
  await ctx.close();
});
