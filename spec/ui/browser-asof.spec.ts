/**
 * The playground's "Evaluate as of" date in a real browser: sent as the date alone, which the
 * server reads as 00:00 UTC of that day, as a pack test's date-only `now`.
 */
import { expect } from 'chai';
import type { Browser } from 'playwright-core';
import { shippedPackRaw } from '../helpers/test-app.ts';
import { hasChromium, launchChromium, startUiApp } from '../helpers/ui-app.ts';
import type { UiApp } from '../helpers/ui-app.ts';

const KYLA = 'Kyla_Zulauf_4ac88c8f-1b22-441b-9f8c-c7d7f9c3ddc5.json';

describe('card viewer in Chromium: the as-of date', function () {
  this.timeout(90_000);
  let browser: Browser | undefined;
  let u: UiApp | undefined;
  let ruleAuthor: string;

  before(async function () {
    if (!hasChromium()) {
      this.skip();
    }
    u = await startUiApp();
    expect((await u.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    ruleAuthor = (await u.t.deps.controlPlane.adminTokens.issue({ role: 'rule-author' })).token;
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
    await u?.close();
  });

  it('sends the date only, says it means 00:00 UTC, and evaluates as of that midnight', async () => {
    const page = await browser!.newPage();
    const pageErrors: string[] = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    await page.goto(`${u!.base}/playground`);
    await page.getByLabel('Operator token').fill(ruleAuthor);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.locator('#pack option[value="medication-safety"]').waitFor({ state: 'attached' });
    await page.locator('#fixture option').first().waitFor({ state: 'attached' });
    await page.locator('#pack').selectOption('medication-safety');
    await page
      .locator('#service option[value="medication-safety-order-sign"]')
      .waitFor({ state: 'attached' });
    await page.locator('#service').selectOption('medication-safety-order-sign');
    await page.locator('#fixture').selectOption(KYLA);
    expect(await page.locator('#asof').inputValue()).to.equal('2021-01-17');
    // The label and its hint (the field's accessible description) say what the date means.
    expect(await page.locator('label[for="asof"]').textContent()).to.include('00:00 UTC');
    expect(await page.locator('#asof-hint').textContent()).to.include('00:00 UTC');

    const sent = page.waitForRequest((r) => r.url().endsWith('/playground/api/evaluate'));
    await page.getByRole('button', { name: 'Evaluate' }).click();
    const body = JSON.parse((await sent).postData() ?? '{}') as { now?: string };
    expect(body.now).to.equal('2021-01-17');
    await page.locator('#cards .card').first().waitFor();
    expect(await page.locator('#summary').textContent()).to.include(
      'as of 2021-01-17T00:00:00.000Z',
    );
    expect(pageErrors).to.deep.equal([]);
  });
});
