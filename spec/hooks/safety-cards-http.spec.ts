/**
 * A hook call must not lose a safety card silently (HTTP, the real app): a 150-character
 * drug name shortens the critical card's summary instead of dropping the card, and the
 * "checks could not run" card is a warning, or critical when a critical check was lost.
 */
import { expect } from 'chai';
import request from 'supertest';
import type { PackRule } from '../../rules/index.ts';
import {
  ALWAYS,
  RECENT_MEDS,
  SAFETY_SERVICE,
  safetyPack,
  safetyRequest,
  WARFARIN_NSAID,
} from '../helpers/safety-pack.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const LONG_NAME = `Ibuprofen 200 MG Oral Tablet ${'(extended release) '.repeat(8)}`
  .padEnd(150, 'x')
  .slice(0, 150);
const CRITICAL_SERVICE = 'safety-critical-order-sign';

interface Card {
  summary: string;
  indicator: string;
  detail?: string;
  suggestions?: Array<{ label: string; uuid: string }>;
}

describe('hook call: no safety card is lost silently (HTTP)', function () {
  this.timeout(60_000);
  let t: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    t = await buildTestApp();
    // The critical warfarin rule of the second pack fails for a patient with two prescriptions.
    const failingCritical: PackRule = {
      ...WARFARIN_NSAID,
      when: `${WARFARIN_NSAID.when} and ${RECENT_MEDS.when}`,
    };
    for (const raw of [
      safetyPack([WARFARIN_NSAID, RECENT_MEDS, ALWAYS]),
      safetyPack([failingCritical, ALWAYS], 'safety-critical'),
    ]) {
      const upload = await t.uploadPack(raw);
      expect(upload.status, JSON.stringify(upload.body)).to.equal(201);
    }
    issuer = await t.addTenant('tenant-safety', {
      subscriptions: [
        { pack: 'safety', version: '1.0.0' },
        { pack: 'safety-critical', version: '1.0.0' },
      ],
    });
  });
  after(async () => t.close());

  async function call(service: string, body: object): Promise<Card[]> {
    const token = await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/${service}` });
    const res = await request(t.app)
      .post(`/cds-services/${service}`)
      .set('authorization', `Bearer ${token}`)
      .send(body);
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    return res.body.cards as Card[];
  }

  it('sends the critical warfarin + NSAID card, its summary shortened, for a 150-character drug name', async () => {
    t.logLines.length = 0;
    const cards = await call(SAFETY_SERVICE, safetyRequest(LONG_NAME));
    expect(cards.map((c) => c.indicator)).to.deep.equal(['critical', 'warning', 'info']);
    const [warfarin] = cards;
    expect(warfarin?.summary).to.have.length(139);
    expect(warfarin?.summary).to.match(
      /^Warfarin \+ Ibuprofen 200 MG Oral Tablet .*…: increased risk of bleeding$/,
    );
    expect(warfarin?.suggestions?.map((s) => s.label)).to.deep.equal([
      'Replace with acetaminophen',
    ]);
    expect(cards.some((c) => c.summary.includes('could not run'))).to.equal(false);
    // The shortening is a rule note in the call's log line, with no patient data.
    const hookCall = t.logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'hook call');
    expect(hookCall).to.include({ cardCount: 3, ruleErrors: 1, rulesSkipped: 0 });
    expect(t.logLines.join('\n')).to.not.contain('extended release');
  });

  it('ends with a warning card when a check with a warning card could not run', async () => {
    const cards = await call(SAFETY_SERVICE, safetyRequest(undefined, true));
    expect(cards.map((c) => [c.summary, c.indicator])).to.deep.equal([
      ['Warfarin + Ibuprofen 200 MG Oral Tablet: increased risk of bleeding', 'critical'],
      ['Order checks ran', 'info'],
      ['1 of 3 checks could not run: no card from them does not mean no issue', 'warning'],
    ]);
    expect(cards[2]?.detail).to.contain('- Recently prescribed medications (failed)');
  });

  it('ends with a critical card when the check that could not run gives a critical card', async () => {
    const cards = await call(CRITICAL_SERVICE, safetyRequest(undefined, true));
    expect(cards.map((c) => [c.summary, c.indicator])).to.deep.equal([
      ['Order checks ran', 'info'],
      ['1 of 2 checks could not run: no card from them does not mean no issue', 'critical'],
    ]);
    expect(cards[1]?.detail).to.contain('- Warfarin with an NSAID (failed)');
    // The same call with one prescription: the critical card itself, and no such card.
    const ok = await call(CRITICAL_SERVICE, safetyRequest());
    expect(ok.map((c) => c.indicator)).to.deep.equal(['critical', 'info']);
  });
});
