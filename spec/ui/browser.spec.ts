/**
 * The card viewer in a real browser (Debian's Chromium through playwright-core): the playground
 * over a Synthea patient, card rendering (indicator, suggestions, feedback, sanitised
 * markdown), and the SMART EHR launch end to end against a local authorization server and FHIR
 * server. Screenshots the playground and the SMART app: into docs/img (which the README shows)
 * with CELLCDS_UPDATE_DOC_IMAGES=1, else into a temporary folder, so that a test run leaves
 * the working tree as it found it.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import type { Browser, Page } from 'playwright-core';
import type { FeedbackItem } from '../../hooks/index.ts';
import { tinyPack } from '../helpers/packs.ts';
import { startSmartServer } from '../helpers/smart-server.ts';
import type { SmartServer } from '../helpers/smart-server.ts';
import { shippedPackRaw, shippedPackVersion } from '../helpers/test-app.ts';
import { hasChromium, launchChromium, startUiApp } from '../helpers/ui-app.ts';
import type { UiApp } from '../helpers/ui-app.ts';

const KYLA = 'Kyla_Zulauf_4ac88c8f-1b22-441b-9f8c-c7d7f9c3ddc5.json';
const MAFALDA = 'Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json';
const CLIENT_ID = 'cellcds-card-viewer';
const UPDATE_DOC_IMAGES = process.env.CELLCDS_UPDATE_DOC_IMAGES === '1';
const IMG_DIR = UPDATE_DOC_IMAGES
  ? path.join(import.meta.dirname, '..', '..', 'docs', 'img')
  : path.join(os.tmpdir(), `cellcds-screenshots-${String(process.pid)}`);

/** A pack whose card text tries every way to run script in the viewer. */
function hostilePack(): Record<string, unknown> {
  const base = tinyPack('hostile');
  return {
    ...base,
    rules: [
      {
        id: 'hostile-markdown',
        service: 'hostile-patient-view',
        when: '%patient.exists()',
        card: {
          summary: 'Hostile <img src=x onerror="window.__xss=1"> summary',
          indicator: 'critical',
          detail: [
            '**Bold** text, then a script: <script>window.__xss = 2</script>',
            '',
            '<img src="x" onerror="window.__xss = 3">',
            '',
            '<iframe src="javascript:window.__xss=4"></iframe>',
            '',
            '[a javascript link](javascript:window.__xss=5) and [a safe link](https://example.org/safe)',
            '',
            '<a href="#" onclick="window.__xss=6">raw anchor</a> <svg onload="window.__xss=7"></svg>',
          ].join('\n'),
          // Pack validation already refuses non-http(s) source and link URLs.
          source: { label: 'Hostile <b>source</b>', url: 'https://example.org/source' },
          links: [
            {
              label: 'Guideline <i>link</i>',
              url: 'https://example.org/guideline',
              type: 'absolute',
            },
          ],
        },
      },
    ],
  };
}

/** A patient-view card with a suggestion, to accept from the SMART app. */
function followUpPack(): Record<string, unknown> {
  const base = tinyPack('followup');
  const services = (base.services as Array<Record<string, unknown>>).map((svc) =>
    svc.hook === 'patient-view' ? { ...svc, title: 'Care reminders' } : svc,
  );
  return {
    ...base,
    services,
    rules: [
      {
        id: 'follow-up',
        service: 'followup-patient-view',
        when: '%patient.exists()',
        card: {
          summary: 'Medication review due',
          indicator: 'info',
          source: { label: 'cellcds specs' },
          suggestions: [
            {
              label: 'Schedule a medication review',
              actions: [
                {
                  type: 'create',
                  description: 'Create a review task',
                  resource: { resourceType: 'Task', status: 'requested', intent: 'order' },
                },
              ],
            },
          ],
        },
      },
    ],
  };
}

describe('card viewer in Chromium', function () {
  this.timeout(90_000);
  let browser: Browser;
  let u: UiApp;
  let smart: SmartServer;
  let ruleAuthor: string;
  const received: Array<{ tenant: string; service: string; items: FeedbackItem[] }> = [];
  const pageErrors: string[] = [];
  /** Closers of what `before` started, run in reverse (also after a partial start). */
  const cleanup: Array<() => Promise<void>> = [];

  before(async function () {
    if (!hasChromium()) {
      this.skip();
    }
    u = await startUiApp({
      smartClientId: CLIENT_ID,
      // As server/app.ts wires it: the feedback goes to the tenant's store (and is recorded
      // here for the assertions).
      onFeedback: async (tenant, service, items) => {
        received.push({ tenant, service, items });
        await u.t.deps.stores.store(tenant).saveFeedback(items, { service });
      },
    });
    cleanup.push(() => u.close());
    smart = await startSmartServer({
      clientId: CLIENT_ID,
      redirectUris: [`${u.base}/app/`],
      patientFile: MAFALDA,
    });
    cleanup.push(() => smart.close());
    expect((await u.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    const hostile = await u.t.uploadPack(hostilePack());
    expect(hostile.status, JSON.stringify(hostile.body)).to.equal(201);
    expect((await u.t.uploadPack(followUpPack())).status).to.equal(201);
    await u.t.addTenant('hospital-a', {
      issuer: smart.signer,
      fhirServers: [smart.fhirBaseUrl],
      subscriptions: [
        { pack: 'medication-safety', version: shippedPackVersion() },
        { pack: 'followup', version: '1.0.0' },
      ],
    });
    ruleAuthor = (await u.t.deps.controlPlane.adminTokens.issue({ role: 'rule-author' })).token;
    browser = await launchChromium();
    cleanup.push(() => browser.close());
    fs.mkdirSync(IMG_DIR, { recursive: true });
  });

  after(async () => {
    for (const close of cleanup.reverse()) {
      await close();
    }
    if (!UPDATE_DOC_IMAGES) {
      fs.rmSync(IMG_DIR, { recursive: true, force: true });
    }
  });

  async function newPage(viewport = { width: 1366, height: 860 }): Promise<Page> {
    const page = await browser.newPage({ viewport });
    page.on('pageerror', (err) => pageErrors.push(err.message));
    return page;
  }

  async function openPlayground(page: Page): Promise<void> {
    await page.goto(`${u.base}/playground`);
    await page.getByLabel('Operator token').fill(ruleAuthor);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.locator('#pack option[value="medication-safety"]').waitFor({ state: 'attached' });
    await page.locator('#fixture option').first().waitFor({ state: 'attached' });
  }

  async function choose(page: Page, pack: string, service: string, fixture: string): Promise<void> {
    await page.locator('#pack').selectOption(pack);
    await page.locator(`#service option[value="${service}"]`).waitFor({ state: 'attached' });
    await page.locator('#service').selectOption(service);
    await page.locator('#fixture').selectOption(fixture);
  }

  it('renders the playground cards, trace and JSON for a warfarin patient with an NSAID draft', async () => {
    const page = await newPage();
    await openPlayground(page);
    await choose(page, 'medication-safety', 'medication-safety-order-sign', KYLA);
    expect(await page.locator('#asof').inputValue()).to.equal('2021-01-17');
    expect(await page.locator('#drafts').inputValue()).to.include('310965');
    await page.getByRole('button', { name: 'Evaluate' }).click();
    await page.locator('#cards .card').first().waitFor();

    const summaries = await page.locator('#cards .card-summary').allTextContents();
    expect(summaries.some((s) => s.startsWith('Warfarin + Ibuprofen'))).to.equal(true);
    // Critical first, shown by text and icon as well as colour.
    const first = page.locator('#cards .card').first();
    expect(await first.getAttribute('data-indicator')).to.equal('critical');
    expect((await first.locator('.indicator-text').textContent())?.trim()).to.equal('Critical');
    expect(await first.locator('.indicator svg').count()).to.equal(1);
    expect(
      await page.locator('#cards .card-warning .indicator-text').first().textContent(),
    ).to.equal('Warning');
    // Trace: every rule, with its result and time.
    const fired = await page.locator('#trace tbody tr.trace-fired').count();
    const rows = await page.locator('#trace tbody tr').count();
    expect(fired).to.be.greaterThan(1);
    expect(rows).to.be.greaterThan(fired);
    expect(
      await page.locator('#trace tr[data-rule="warfarin-nsaid"] .trace-status').textContent(),
    ).to.include('Fired');
    expect(await page.locator('#request-json').textContent()).to.include('"hook": "order-sign"');
    expect(await page.locator('#response-json').textContent()).to.include('"cards"');
    // Every form control has a label; the results are a labelled landmark region.
    type Control = { id: string; labels: { length: number } | null };
    const unlabelled: string[] = await page.$$eval('input, select, textarea', (els: unknown[]) =>
      (els as Control[]).filter((e) => e.labels?.length === 0).map((e) => e.id),
    );
    expect(unlabelled).to.deep.equal([]);
    expect(await page.locator('main').count()).to.equal(1);
    await page.screenshot({ path: path.join(IMG_DIR, 'playground.png'), fullPage: true });
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it("keeps the chosen pack's services when an earlier pack's answer arrives late", async () => {
    const page = await newPage();
    // Every other pack's version detail is answered after the user has chosen another pack
    // (answers can arrive out of order under load: a CI run saw it).
    let late = 0;
    await page.route(/\/playground\/api\/packs\/[^/]+\/versions\//, async (route) => {
      if (!route.request().url().includes('/packs/medication-safety/')) {
        late++;
        await new Promise((resolve) => setTimeout(resolve, 1500));
      }
      await route.continue();
    });
    await openPlayground(page);
    await choose(page, 'medication-safety', 'medication-safety-order-sign', KYLA);
    await page.waitForTimeout(2000);
    expect(late).to.be.greaterThan(0);
    expect(await page.locator('#pack').inputValue()).to.equal('medication-safety');
    expect(await page.locator('#service').inputValue()).to.equal('medication-safety-order-sign');
    const options = page.locator('#service option');
    const services: string[] = [];
    for (let k = 0; k < (await options.count()); k++) {
      services.push((await options.nth(k).getAttribute('value')) ?? '');
    }
    expect(services).to.include('medication-safety-order-sign');
    expect(services.every((s) => s.startsWith('medication-safety-'))).to.equal(true);
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it("shows the last submitted token's outcome when an earlier token's catalog arrives late", async () => {
    const page = await newPage();
    let first = true;
    await page.route(/\/playground\/api\/packs$/, async (route) => {
      if (first) {
        first = false;
        await new Promise((resolve) => setTimeout(resolve, 1500));
      }
      await route.continue();
    });
    await page.goto(`${u.base}/playground`);
    await page.getByLabel('Operator token').fill(ruleAuthor);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.getByLabel('Operator token').fill('ccds_op_NotARealToken0123456789');
    await page.getByRole('button', { name: 'Use token' }).click();
    const status = page.locator('#token-status');
    await page.locator('#token-status', { hasText: 'refused' }).waitFor();
    await page.waitForTimeout(2000);
    expect(first).to.equal(false);
    expect(await status.textContent()).to.include('The token was refused');
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it('posts feedback when a suggestion is clicked, honouring at-most-one', async () => {
    const page = await newPage();
    await openPlayground(page);
    await choose(page, 'medication-safety', 'medication-safety-order-sign', KYLA);
    await page.getByRole('button', { name: 'Evaluate' }).click();
    const card = page.locator('#cards .card', {
      has: page.locator('.card-summary', {
        hasText: /^Warfarin \+ Ibuprofen.*: increased risk of bleeding$/,
      }),
    });
    await card.waitFor();
    const buttons = card.locator('button.suggestion');
    expect(await buttons.count()).to.equal(2);
    const recommended = card.locator('button.suggestion.recommended');
    expect(await recommended.textContent()).to.include('Recommended');
    const suggestionUuid = await recommended.getAttribute('data-suggestion-uuid');
    const cardUuid = await card.getAttribute('data-card-uuid');

    const [req, res] = await Promise.all([
      page.waitForRequest((r) => r.url().endsWith('/playground/api/feedback')),
      page.waitForResponse((r) => r.url().endsWith('/playground/api/feedback')),
      recommended.click(),
    ]);
    const sent = req.postDataJSON() as { service: string; feedback: FeedbackItem[] };
    expect(sent.service).to.equal('medication-safety-order-sign');
    expect(sent.feedback).to.have.length(1);
    expect(sent.feedback[0]).to.include({ card: cardUuid, outcome: 'accepted' });
    expect(sent.feedback[0]?.acceptedSuggestions).to.deep.equal([{ id: suggestionUuid }]);
    expect(res.status()).to.equal(200);
    expect(((await res.json()) as { stored: boolean }).stored).to.equal(false);
    await card.locator('.card-status', { hasText: 'Accepted' }).waitFor();
    expect(await recommended.getAttribute('aria-pressed')).to.equal('true');
    expect(await buttons.nth(1).isDisabled()).to.equal(true);
    expect(await page.locator('#feedback-json').textContent()).to.include(String(suggestionUuid));
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it('does not execute script or event handlers from a card (markdown, summary, links)', async () => {
    const page = await newPage();
    const csp: string[] = [];
    page.on('console', (m) => {
      if (m.text().includes('Content Security Policy')) {
        csp.push(m.text());
      }
    });
    await openPlayground(page);
    await choose(page, 'hostile', 'hostile-patient-view', KYLA);
    await page.getByRole('button', { name: 'Evaluate' }).click();
    const card = page.locator('#cards .card').first();
    await card.waitFor();
    await page.waitForTimeout(300);
    expect(await page.evaluate(() => (globalThis as { __xss?: unknown }).__xss)).to.equal(
      undefined,
    );
    // The sanitiser, not only the CSP, removed them: no script, img, iframe, svg or handlers.
    const detail = card.locator('.card-detail');
    expect(
      await detail.locator('script, img, iframe, svg, [onerror], [onclick], [onload]').count(),
    ).to.equal(0);
    expect(await page.locator('[onerror], [onclick], [onload], iframe').count()).to.equal(0);
    expect(await detail.locator('strong').textContent()).to.equal('Bold');
    // Raw HTML is shown as text, not interpreted.
    expect(await detail.textContent()).to.include('<script>window.__xss = 2</script>');
    expect(await card.locator('.card-summary').textContent()).to.include('<img src=x onerror=');
    // javascript: URLs lose their href; http(s) links open in a new tab without an opener.
    const jsLink = detail.locator('a', { hasText: 'a javascript link' });
    expect(await jsLink.getAttribute('href')).to.equal(null);
    const safe = detail.locator('a', { hasText: 'a safe link' });
    expect(await safe.getAttribute('href')).to.equal('https://example.org/safe');
    expect(await safe.getAttribute('target')).to.equal('_blank');
    expect(await safe.getAttribute('rel')).to.equal('noopener noreferrer');
    expect(await card.locator('.card-source a').textContent()).to.include('Hostile <b>source</b>');
    expect(await card.locator('.card-links a').textContent()).to.include('Guideline <i>link</i>');
    expect(await card.locator('.card-source b, .card-links i').count()).to.equal(0);
    expect(csp).to.deep.equal([]);
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it('runs the SMART EHR launch end to end and renders the patient-view cards', async () => {
    // About the size of an EHR's embedded app panel.
    const page = await newPage({ width: 1024, height: 520 });
    const authorizeBefore = smart.authorizeRequests.length;
    await page.goto(smart.launchUrl(`${u.base}/app/launch`));
    await page.locator('.card').first().waitFor();

    const authorize = smart.authorizeRequests[authorizeBefore];
    expect(authorize).to.include({
      client_id: CLIENT_ID,
      code_challenge_method: 'S256',
      aud: smart.fhirBaseUrl,
      redirect_uri: `${u.base}/app/`,
    });
    expect(authorize?.scope?.split(' ')).to.include.members([
      'launch',
      'launch/patient',
      'openid',
      'fhirUser',
    ]);
    const url = new URL(page.url());
    expect(url.pathname).to.equal('/app/');
    expect(url.searchParams.has('code')).to.equal(false);

    const summary = await page.locator('.card .card-summary').first().textContent();
    expect(summary).to.match(/^Warfarin \+ Naproxen.* both active/);
    expect(await page.locator('.card .indicator-text').first().textContent()).to.equal('Warning');
    await page.locator('#patient-banner strong').waitFor();
    expect(await page.locator('#patient-banner').textContent()).to.include('Mafalda');
    // cellcds fetched the prefetch itself, with the launch's access token.
    const token = smart.accessTokens.at(-1);
    const serverSide = smart.fhirRequests.filter((r) => !(r.userAgent ?? '').includes('Chrome'));
    expect(
      serverSide.some(
        (r) =>
          r.url.startsWith('/fhir/MedicationRequest?') && r.authorization === `Bearer ${token}`,
      ),
    ).to.equal(true);
    await page.screenshot({ path: path.join(IMG_DIR, 'smart-app.png'), fullPage: true });

    // Override with the keyboard: open the form, type a comment, submit with Enter.
    const card = page.locator('.card').first();
    await card.locator('summary', { hasText: 'Override' }).focus();
    await page.keyboard.press('Enter');
    await card.getByLabel('Comment (optional)').focus();
    await page.keyboard.type('Patient counselled; INR monitored weekly');
    await page.keyboard.press('Tab');
    const before = received.length;
    await page.keyboard.press('Enter');
    await card.locator('.card-status', { hasText: 'Overridden' }).waitFor();
    expect(received.length).to.equal(before + 1);
    const got = received.at(-1);
    expect(got?.tenant).to.equal('hospital-a');
    expect(got?.service).to.equal('medication-safety-patient-view');
    expect(got?.items[0]).to.include({
      card: await card.getAttribute('data-card-uuid'),
      outcome: 'overridden',
    });
    expect(got?.items[0]?.overrideReason).to.deep.equal({
      userComment: 'Patient counselled; INR monitored weekly',
    });
    // The tenant's store holds the feedback, linked to the invocation that produced the card.
    const cardUuid = (await card.getAttribute('data-card-uuid')) ?? '';
    const store = u.t.deps.stores.store('hospital-a');
    const invocationId = await store.findCard(cardUuid);
    expect(invocationId, 'the card was recorded with its invocation').to.be.a('string');
    const record = await store.readInvocation(invocationId ?? '');
    expect(record.feedback.map((f) => [f.card, f.outcome])).to.deep.equal([
      [cardUuid, 'overridden'],
    ]);
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it("in the SMART app, a suggestion click posts feedback that the tenant's store then holds", async () => {
    const page = await newPage({ width: 1024, height: 700 });
    await page.goto(smart.launchUrl(`${u.base}/app/launch`));
    const card = page.locator('.card', {
      has: page.locator('.card-summary', { hasText: 'Medication review due' }),
    });
    await card.waitFor();
    const button = card.locator('button.suggestion');
    const suggestionUuid = (await button.getAttribute('data-suggestion-uuid')) ?? '';
    const cardUuid = (await card.getAttribute('data-card-uuid')) ?? '';
    const before = received.length;
    await button.click();
    await card.locator('.card-status', { hasText: 'Accepted' }).waitFor();
    expect(received.length).to.equal(before + 1);
    const store = u.t.deps.stores.store('hospital-a');
    const invocationId = await store.findCard(cardUuid);
    expect(invocationId, 'the card was recorded with its invocation').to.be.a('string');
    const record = await store.readInvocation(invocationId ?? '');
    expect(record.feedback).to.have.length(1);
    expect(record.feedback[0]?.item).to.deep.include({
      card: cardUuid,
      outcome: 'accepted',
      acceptedSuggestions: [{ id: suggestionUuid }],
    });
    expect(pageErrors).to.deep.equal([]);
    await page.close();
  });

  it('fails closed when the EHR id_token names another client: no cards, no prefetch', async () => {
    const page = await newPage();
    smart.idTokenClaims.aud = 'some-other-app';
    try {
      const fetchesBefore = smart.fhirRequests.filter(
        (r) => !(r.userAgent ?? '').includes('Chrome'),
      ).length;
      await page.goto(smart.launchUrl(`${u.base}/app/launch`));
      await page.locator('#app-status.error').waitFor();
      expect(await page.locator('#app-status').textContent()).to.include(
        'cellcds refused this launch',
      );
      expect(await page.locator('.card').count()).to.equal(0);
      const fetchesAfter = smart.fhirRequests.filter(
        (r) => !(r.userAgent ?? '').includes('Chrome'),
      ).length;
      expect(fetchesAfter).to.equal(fetchesBefore);
      const audit = await u.t.deps.controlPlane.audit.list({ type: 'auth.failure' });
      expect(audit.at(-1)?.detail).to.deep.include({
        reason: 'bad_aud',
        endpoint: '/app/api/patient-view',
      });
    } finally {
      delete smart.idTokenClaims.aud;
    }
    await page.close();
  });

  it("refuses a launch link that carries a clientId (fhirclient would let it override the tenant's)", async () => {
    const page = await newPage();
    const before = smart.authorizeRequests.length;
    await page.goto(smart.launchUrl(`${u.base}/app/launch`, { clientId: 'evil-client' }));
    await page.locator('#launch-status.error').waitFor();
    expect(await page.locator('#launch-status').textContent()).to.include('carries clientId');
    expect(smart.authorizeRequests.length).to.equal(before);
    await page.close();
  });

  it('refuses to start a launch without iss and launch parameters', async () => {
    const page = await newPage();
    const before = smart.authorizeRequests.length;
    await page.goto(`${u.base}/app/launch?fhirServiceUrl=${encodeURIComponent(smart.fhirBaseUrl)}`);
    await page.locator('#launch-status.error').waitFor();
    expect(await page.locator('#launch-status').textContent()).to.include(
      'Open this app from your EHR',
    );
    expect(smart.authorizeRequests.length).to.equal(before);
    await page.close();
  });
});
