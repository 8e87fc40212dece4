/**
 * The playground shows what each let held and which part of a rule's `when` came out empty,
 * so a rule that silently never fires (here: a value set with the wrong code system) can be
 * debugged; the values come only with the playground's own calls.
 */
import { expect } from 'chai';
import request from 'supertest';
import type { Browser } from 'playwright-core';
import { hasChromium, launchChromium, startUiApp } from '../helpers/ui-app.ts';
import type { UiApp } from '../helpers/ui-app.ts';

const KYLA = 'Kyla_Zulauf_4ac88c8f-1b22-441b-9f8c-c7d7f9c3ddc5.json';
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

function typoPack(): Record<string, unknown> {
  return {
    id: 'system-typo',
    version: '1.0.0',
    title: 'System typo',
    publisher: 'cellcds specs',
    description: 'A value set with the wrong code system (NDC for an RxNorm code).',
    services: [{ id: 'typo-sign', hook: 'order-sign', description: 'd' }],
    valueSets: {
      nsaids: {
        codes: [{ system: 'http://hl7.org/fhir/sid/ndc', code: '310965' }],
      },
    },
    let: {
      draftMeds: '%draftOrders.entry.resource.ofType(MedicationRequest)',
      nsaidDrafts: "%draftMeds.where(medication.ofType(CodeableConcept).inValueSet('nsaids'))",
    },
    rules: [
      {
        id: 'nsaid-draft',
        service: 'typo-sign',
        when: '%draftMeds.exists() and %nsaidDrafts.exists()',
        card: { summary: 'NSAID draft', indicator: 'warning', source: { label: 'x' } },
      },
    ],
  };
}

const DRAFT = {
  resourceType: 'MedicationRequest',
  id: 'ibu',
  status: 'draft',
  intent: 'order',
  medicationCodeableConcept: { coding: [{ system: RXNORM, code: '310965' }] },
};

describe('playground: let values and the first false operand', function () {
  this.timeout(120_000);
  let u: UiApp;
  let ruleAuthor: string;

  before(async () => {
    u = await startUiApp();
    const up = await u.t.uploadPack(typoPack());
    expect(up.status, JSON.stringify(up.body)).to.equal(201);
    ruleAuthor = (await u.t.deps.controlPlane.adminTokens.issue({ role: 'rule-author' })).token;
  });
  after(async () => u.close());

  it('answers each let with a summary of its value, and the rule with its first false operand', async () => {
    const res = await request(u.handler)
      .post('/playground/api/evaluate')
      .set('authorization', `Bearer ${ruleAuthor}`)
      .send({
        pack: 'system-typo',
        version: '1.0.0',
        service: 'typo-sign',
        patient: { fixture: KYLA },
        draftOrders: [DRAFT],
        now: '2021-01-17T23:59:59Z',
      });
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    const lets = new Map(
      (res.body.lets as Array<{ name: string; value?: string }>).map((l) => [l.name, l.value]),
    );
    expect(lets.get('draftMeds')).to.equal(`1 item: MedicationRequest/ibu ${RXNORM}|310965`);
    expect(lets.get('nsaidDrafts')).to.equal('0 items');
    expect(res.body.trace[0]).to.deep.include({
      ruleId: 'nsaid-draft',
      status: 'not-fired',
      firstFalse: { operand: 2, of: 2, expression: '%nsaidDrafts.exists()', result: 'false' },
    });
  });

  it('renders the lets table and the first false operand in the browser', async function () {
    if (!hasChromium()) {
      this.skip();
    }
    const browser: Browser = await launchChromium();
    try {
      const page = await browser.newPage();
      const errors: string[] = [];
      page.on('pageerror', (err) => errors.push(err.message));
      await page.goto(`${u.base}/playground`);
      await page.getByLabel('Operator token').fill(ruleAuthor);
      await page.getByRole('button', { name: 'Use token' }).click();
      await page.locator('#pack option[value="system-typo"]').waitFor({ state: 'attached' });
      await page.locator('#fixture option').first().waitFor({ state: 'attached' });
      await page.locator('#pack').selectOption('system-typo');
      await page.locator('#service option[value="typo-sign"]').waitFor({ state: 'attached' });
      await page.locator('#service').selectOption('typo-sign');
      await page.locator('#fixture').selectOption(KYLA);
      await page.locator('#drafts').fill(JSON.stringify([DRAFT]));
      await page.getByRole('button', { name: 'Evaluate' }).click();
      await page.locator('#lets tbody tr').first().waitFor();
      expect(
        await page.locator('#lets tr[data-let="nsaidDrafts"] .let-value').textContent(),
      ).to.equal('0 items');
      expect(
        await page.locator('#lets tr[data-let="draftMeds"] .let-value').textContent(),
      ).to.equal(`1 item: MedicationRequest/ibu ${RXNORM}|310965`);
      const why = await page
        .locator('#trace tr[data-rule="nsaid-draft"] .first-false')
        .textContent();
      expect(why).to.include('First part to come out false (2 of 2)');
      expect(why).to.include('%nsaidDrafts.exists()');
      expect(errors).to.deep.equal([]);
    } finally {
      await browser.close();
    }
  });
});
