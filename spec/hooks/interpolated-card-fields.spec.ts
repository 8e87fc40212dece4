import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

/** A patient name planted in the calls: it must reach neither an error nor a log line. */
const PLANTED = 'Planted Quillfeather';
const SERVICE = 'family-link-patient-view';

/**
 * A pack whose first rule's link label is `{{%patient.name.family}}`: valid at upload, empty
 * for a patient who has only `name.text`. Its second rule's card is static.
 */
function familyLinkPack(): Record<string, unknown> {
  return {
    id: 'family-link',
    version: '1.0.0',
    title: 'Family link pack',
    publisher: 'cellcds specs',
    description: 'A link label interpolated from patient data.',
    services: [
      {
        id: SERVICE,
        hook: 'patient-view',
        description: 'Links to the family chart.',
        prefetch: { patient: 'Patient/{{context.patientId}}' },
      },
    ],
    rules: [
      {
        id: 'family-chart',
        service: SERVICE,
        when: '%patient.exists()',
        card: {
          summary: 'Family chart available',
          indicator: 'info',
          source: { label: 'cellcds specs' },
          links: [
            {
              label: '{{%patient.name.family}}',
              url: 'https://chart.example.org/family',
              type: 'absolute',
            },
          ],
        },
      },
      {
        id: 'hello',
        service: SERVICE,
        when: '%patient.exists()',
        card: {
          summary: 'Hello from the family pack',
          indicator: 'info',
          source: { label: 'cellcds specs' },
        },
      },
    ],
  };
}

describe('hook call: a card field that interpolation leaves empty (HTTP)', () => {
  let t: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    t = await buildTestApp();
    const upload = await t.uploadPack(familyLinkPack());
    expect(upload.status, JSON.stringify(upload.body)).to.equal(201);
    issuer = await t.addTenant('tenant-family', {
      subscriptions: [{ pack: 'family-link', version: '1.0.0' }],
    });
  });
  after(async () => t.close());

  async function call(body: Record<string, unknown>): Promise<request.Response> {
    const token = await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/${SERVICE}` });
    return request(t.app)
      .post(`/cds-services/${SERVICE}`)
      .set('authorization', `Bearer ${token}`)
      .send(body);
  }

  it('answers 200 with the other rule card, not 500, when a link label comes out empty', async () => {
    t.logLines.length = 0;
    const res = await call(patientViewRequest(PLANTED)); // name.text only, no name.family
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.cards.map((c: { summary: string }) => c.summary)).to.deep.equal([
      'Hello from the family pack',
      // The failed rule gave no card: the answer says a check did not run (no patient data).
      '1 of 2 checks could not run: no card from them does not mean no issue',
    ]);
    const incomplete = res.body.cards[1] as { indicator: string; detail: string };
    // The other rule ran and the failed one gives an info card: a warning, not info.
    expect(incomplete.indicator).to.equal('warning');
    expect(incomplete.detail).to.contain('- family-chart (failed)');
    expect(incomplete.detail).to.not.contain('Quillfeather');
    const hookCall = t.logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'hook call');
    expect(hookCall).to.include({ cardCount: 2, ruleErrors: 1, rulesSkipped: 0, level: 'warn' });
    expect(t.logLines.join('\n')).to.not.contain('Planted').and.to.not.contain('Quillfeather');
  });

  it('answers both cards when the interpolated label has a value', async () => {
    const body = patientViewRequest(PLANTED);
    const prefetch = body.prefetch as { patient: { name: unknown } };
    prefetch.patient.name = [{ family: 'Quillfeather', given: ['Planted'] }];
    const res = await call(body);
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.cards).to.have.length(2);
    expect(res.body.cards[0].links).to.deep.equal([
      { label: 'Quillfeather', url: 'https://chart.example.org/family', type: 'absolute' },
    ]);
  });
});

const REF_SERVICE = 'lab-order-patient-view';

/**
 * A pack whose one rule suggests creating a lab order twice: once for `Patient/` plus the
 * patient's family name (absent for a patient who has only `name.text`: `Patient/`), once for
 * `Patient/{{%context.patientId}}`. Valid at upload: both subjects are interpolated.
 */
function labOrderPack(): Record<string, unknown> {
  const order = (label: string, reference: string): Record<string, unknown> => ({
    label,
    actions: [
      {
        type: 'create',
        description: 'Order an INR',
        resource: {
          resourceType: 'ServiceRequest',
          status: 'draft',
          intent: 'order',
          code: { text: 'INR' },
          subject: { reference },
          basedOn: [{ reference: 'CarePlan/cp-1' }],
        },
      },
    ],
  });
  return {
    id: 'lab-order',
    version: '1.0.0',
    title: 'Lab order pack',
    publisher: 'cellcds specs',
    description: 'A suggestion whose subject reference is interpolated.',
    services: [
      {
        id: REF_SERVICE,
        hook: 'patient-view',
        description: 'Suggests an INR.',
        prefetch: { patient: 'Patient/{{context.patientId}}' },
      },
    ],
    rules: [
      {
        id: 'inr',
        service: REF_SERVICE,
        when: '%patient.exists()',
        card: {
          summary: 'INR due',
          indicator: 'info',
          source: { label: 'cellcds specs' },
          suggestions: [
            order('By family name', 'Patient/{{%patient.name.family}}'),
            order('By patient id', 'Patient/{{%context.patientId}}'),
          ],
        },
      },
    ],
  };
}

describe('hook call: a suggestion resource reference that interpolation breaks (HTTP)', () => {
  let t: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    t = await buildTestApp();
    const upload = await t.uploadPack(labOrderPack());
    expect(upload.status, JSON.stringify(upload.body)).to.equal(201);
    issuer = await t.addTenant('tenant-lab', {
      subscriptions: [{ pack: 'lab-order', version: '1.0.0' }],
    });
  });
  after(async () => t.close());

  it('sends the card without the suggestion whose subject came out Patient/, and logs a rule error', async () => {
    t.logLines.length = 0;
    const token = await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/${REF_SERVICE}` });
    const res = await request(t.app)
      .post(`/cds-services/${REF_SERVICE}`)
      .set('authorization', `Bearer ${token}`)
      .send(patientViewRequest(PLANTED)); // name.text only, no name.family
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    const cards = res.body.cards as Array<{
      summary: string;
      suggestions?: Array<{ label: string; actions: Array<{ resource: unknown }> }>;
    }>;
    expect(cards.map((c) => c.summary)).to.deep.equal(['INR due']);
    expect(cards[0]?.suggestions?.map((s) => s.label)).to.deep.equal(['By patient id']);
    expect(cards[0]?.suggestions?.[0]?.actions[0]?.resource).to.deep.include({
      subject: { reference: 'Patient/pat-1' },
      basedOn: [{ reference: 'CarePlan/cp-1' }],
    });
    expect(JSON.stringify(res.body)).to.not.contain('"Patient/"');
    const hookCall = t.logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'hook call');
    expect(hookCall).to.include({ cardCount: 1, ruleErrors: 1 });
    expect(t.logLines.join('\n')).to.not.contain('Planted').and.to.not.contain('Quillfeather');
  });
});
