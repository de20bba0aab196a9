import { expect, Page, ConsoleMessage } from "@playwright/test";
import * as fs from "node:fs";
import * as path from "node:path";
import * as zlib from "node:zlib";

export const SHOTS = path.resolve(__dirname, "..", "screenshots");
fs.mkdirSync(SHOTS, { recursive: true });
export const shot = (name: string) => path.join(SHOTS, `${name}.png`);

/** Opens a page and waits until the wasm has hydrated it (clicks before that do nothing). */
export async function gotoHydrated(page: Page, url: string) {
  await page.goto(url);
  await page.waitForLoadState("networkidle");
  await expect(page.locator("body[data-hydrated=true]")).toBeAttached({ timeout: 30_000 });
}

/** Collects console errors and uncaught exceptions of a page. */
export function watchConsole(page: Page, allow: RegExp[] = []) {
  const errors: string[] = [];
  page.on("console", (m: ConsoleMessage) => {
    if (m.type() === "error" && !allow.some((r) => r.test(m.text()))) errors.push(m.text());
  });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  return errors;
}

/** Records every JobEvent the page receives over /ws. */
export function watchSocket(page: Page) {
  const events: any[] = [];
  page.on("websocket", (ws) => {
    if (!ws.url().endsWith("/ws")) return;
    ws.on("framereceived", (f) => {
      try {
        events.push(JSON.parse(String(f.payload)));
      } catch {}
    });
  });
  return events;
}

/** Width and height from a PNG's IHDR chunk. */
export function pngSize(buf: Buffer): { width: number; height: number } {
  expect(buf.subarray(0, 8).toString("hex")).toBe("89504e470d0a1a0a");
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

/** A PNG text chunk (tEXt, zTXt or iTXt) by keyword. */
export function pngText(buf: Buffer, keyword: string): string | undefined {
  let off = 8;
  while (off < buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.subarray(off + 4, off + 8).toString("latin1");
    const data = buf.subarray(off + 8, off + 8 + len);
    const nul = data.indexOf(0);
    if (nul > 0 && data.subarray(0, nul).toString("latin1") === keyword) {
      if (type === "tEXt") return data.subarray(nul + 1).toString("latin1");
      if (type === "zTXt") return zlib.inflateSync(data.subarray(nul + 2)).toString("latin1");
      if (type === "iTXt") {
        const compressed = data[nul + 1] === 1;
        let p = nul + 3;
        p = data.indexOf(0, p) + 1; // language tag
        p = data.indexOf(0, p) + 1; // translated keyword
        const text = data.subarray(p);
        return (compressed ? zlib.inflateSync(text) : text).toString("utf8");
      }
    }
    off += 12 + len;
  }
  return undefined;
}

/** Keeps every distinct preview image the page shows (MutationObserver in the page). */
export async function recordPreviews(page: Page) {
  await page.evaluate(() => {
    const w = window as any;
    w.__previews = [];
    const grab = () =>
      document.querySelectorAll<HTMLImageElement>("img[data-testid=preview]").forEach((img) => {
        if (img.src && !w.__previews.includes(img.src)) w.__previews.push(img.src);
      });
    new MutationObserver(grab).observe(document.body, {
      subtree: true,
      childList: true,
      attributes: true,
      attributeFilter: ["src"],
    });
  });
  return () => page.evaluate(() => ((window as any).__previews as string[]).length);
}

/** axe-core's rule sets the studio must pass: WCAG 2.1 A and AA, and axe's best practices. */
export const AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"];

/** Runs axe-core on the page as it is now; returns its violations, one line per element. */
export async function axeViolations(page: Page): Promise<string[]> {
  // loaded lazily: specs without audits need not have it installed
  const { default: AxeBuilder } = await import("@axe-core/playwright");
  const results = await new AxeBuilder({ page }).withTags(AXE_TAGS).analyze();
  return results.violations.flatMap((v) =>
    v.nodes.map((n) => `${v.id} (${v.impact}): ${v.help} at ${n.target.join(" ")} — ${n.failureSummary?.replace(/\s+/g, " ")}`),
  );
}

/** The fixture photo with a `parameters` tEXt chunk inserted after IHDR. */
export function pngWithParameters(text: string): Buffer {
  const src = fs.readFileSync(path.resolve(__dirname, "..", "fixtures", "photo-640x480.png"));
  const data = Buffer.concat([Buffer.from("parameters\0", "latin1"), Buffer.from(text, "latin1")]);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const type = Buffer.from("tEXt", "latin1");
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(Buffer.concat([type, data])) >>> 0);
  const ihdrEnd = 8 + 12 + 13;
  return Buffer.concat([src.subarray(0, ihdrEnd), len, type, data, crc, src.subarray(ihdrEnd)]);
}

/** Sets a range input's value the way a user's drag does (an input event). */
export async function setRange(page: Page, selector: string, value: string) {
  await page.locator(selector).evaluate((el: HTMLInputElement, v) => {
    el.value = v;
    el.dispatchEvent(new Event("input", { bubbles: true }));
  }, value);
}
