import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Every value in a CDS Hooks response: no null, "", [] or {} (except the top-level cards). */
function assertNoEmpties(value: unknown, path = '$'): void {
  expect(value, path).to.not.equal(null);
  if (typeof value === 'string') {
    expect(value, path).to.not.equal('');
  } else if (Array.isArray(value)) {
    expect(value.length, path).to.be.greaterThan(0);
    value.forEach((v, i) => {
      assertNoEmpties(v, `${path}[${i}]`);
    });
  } else if (typeof value === 'object') {
    expect(Object.keys(value as object).length, path).to.be.greaterThan(0);
    for (const [k, v] of Object.entries(value as object)) {
      assertNoEmpties(v, `${path}.${k}`);
    }
  }
}

describe('CDS Hooks 2.0 endpoints (server)', () => {
  let t: TestApp;
  let issuer: TestIssuer;
  let lonely: TestIssuer;
  const svcUrl = (id: string) => `${PUBLIC_URL}/cds-services/${id}`;

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await t.addTenant('tenant-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    lonely = await t.addTenant('tenant-empty');
  });
  after(async () => t.close());

  it("lists the calling tenant's services in discovery, with no empty fields", async () => {
    const token = await issuer.sign({ aud: `${PUBLIC_URL}/cds-services` });
    const res = await request(t.app).get('/cds-services').set('authorization', `Bearer ${token}`);
    expect(res.status).to.equal(200);
    expect(res.body.services.map((s: { id: string }) => s.id).sort()).to.deep.equal([
      'tiny-order-sign',
      'tiny-patient-view',
    ]);
    for (const s of res.body.services) {
      expect(s).to.include.keys('hook', 'id', 'description');
      assertNoEmpties(s);
    }
  });

  it('answers discovery with {"services": []} for a tenant without subscriptions', async () => {
    const token = await lonely.sign({ aud: `${PUBLIC_URL}/cds-services` });
    const res = await request(t.app).get('/cds-services').set('authorization', `Bearer ${token}`);
    expect(res.status).to.equal(200);
    expect(res.body).to.deep.equal({ services: [] });
  });

  it('answers a signed order-sign call with conformant cards from the pack', async () => {
    const token = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.cards).to.have.length(1);
    const card = res.body.cards[0];
    assertNoEmpties(card);
    expect(card.uuid).to.match(UUID);
    expect(card.summary).to.equal('Warfarin with an NSAID draft');
    expect(card.summary.length).to.be.lessThan(140);
    expect(card.indicator).to.equal('warning');
    expect(card.source.label).to.equal('cellcds specs');
    expect(card.selectionBehavior).to.equal('at-most-one');
    expect(card.suggestions[0].uuid).to.match(UUID);
    expect(card.suggestions[0].actions[0]).to.deep.equal({
      type: 'delete',
      description: 'Remove the draft NSAID',
      resourceId: 'MedicationRequest/draft-1',
    });
    expect(card.overrideReasons[0].display).to.equal('Benefit outweighs risk');
    expect(card).to.not.have.property('ruleId');
  });

  it('ignores prefetch keys the service did not ask for (not checked, not kept), checks its own', async () => {
    const call = async (prefetch: Record<string, unknown>) => {
      const body = warfarinNsaidRequest() as { prefetch: Record<string, unknown> };
      body.prefetch = { ...body.prefetch, ...prefetch };
      const token = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
      return request(t.app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${token}`)
        .send(body);
    };
    // The 2.0 spec example's bare-string `user` key, which this service never declared.
    const extra = await call({ user: '123', labs: { resourceType: 'Bundle', type: 'searchset' } });
    expect(extra.status, JSON.stringify(extra.body)).to.equal(200);
    expect(extra.body.cards).to.have.length(1);
    const declared = await call({ meds: '123' });
    expect(declared.status).to.equal(400);
    expect(declared.body).to.include({ field: 'prefetch.meds' });
  });

  it('gives every card and suggestion a fresh uuid on each call', async () => {
    const uuids = new Set<string>();
    for (let i = 0; i < 3; i++) {
      const token = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
      const res = await request(t.app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${token}`)
        .send(warfarinNsaidRequest());
      uuids.add(res.body.cards[0].uuid);
      uuids.add(res.body.cards[0].suggestions[0].uuid);
    }
    expect(uuids.size).to.equal(6);
  });

  it('evaluates a pack wholly on the fast path in the calling thread, and says so in the metrics', async () => {
    const token = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
    expect(res.status).to.equal(200);
    const metrics = await request(t.app).get('/metrics');
    const count = (where: string) =>
      Number(
        new RegExp(`^cellcds_evaluations_total\\{[^}]*where="${where}"[^}]*\\} (\\d+)`, 'm').exec(
          metrics.text,
        )?.[1] ?? 0,
      );
    expect(count('inline')).to.be.at.least(1);
    expect(count('handed_off')).to.equal(0);
  });

  it('answers {"cards": []} when no rule fires', async () => {
    const body = warfarinNsaidRequest();
    (body.prefetch as Record<string, unknown>).meds = null; // null = no data
    const token = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(body);
    expect(res.status).to.equal(200);
    expect(res.body).to.deep.equal({ cards: [] });
  });

  it('answers patient-view', async () => {
    const token = await issuer.sign({ aud: svcUrl('tiny-patient-view') });
    const res = await request(t.app)
      .post('/cds-services/tiny-patient-view')
      .set('authorization', `Bearer ${token}`)
      .send(patientViewRequest());
    expect(res.status).to.equal(200);
    expect(res.body.cards[0].summary).to.equal('Hello from the tiny pack');
  });

  it('refuses a request whose hook does not match the service, naming the field', async () => {
    const body = { ...patientViewRequest(), hook: 'order-sign' };
    const token = await issuer.sign({ aud: svcUrl('tiny-patient-view') });
    const res = await request(t.app)
      .post('/cds-services/tiny-patient-view')
      .set('authorization', `Bearer ${token}`)
      .send(body);
    expect(res.status).to.equal(400);
    expect(res.body.error).to.equal('invalid_request');
    expect(res.body.field).to.equal('hook');
  });

  it('answers 404 for a service the tenant does not have', async () => {
    const token = await issuer.sign({ aud: svcUrl('nope') });
    const res = await request(t.app)
      .post('/cds-services/nope')
      .set('authorization', `Bearer ${token}`)
      .send(patientViewRequest());
    expect(res.status).to.equal(404);
    expect(res.body.error).to.equal('not_found');
  });

  it('answers CORS preflight without a JWT', async () => {
    for (const path of [
      '/cds-services',
      '/cds-services/tiny-order-sign',
      '/cds-services/tiny-order-sign/feedback',
    ]) {
      const res = await request(t.app)
        .options(path)
        .set('origin', 'https://ehr.example')
        .set('access-control-request-method', 'POST')
        .set('access-control-request-headers', 'authorization, content-type');
      expect(res.status, path).to.equal(204);
      expect(res.headers['access-control-allow-origin']).to.equal('*');
      expect(res.headers['access-control-allow-headers']).to.match(/authorization/i);
      expect(res.headers['access-control-allow-methods']).to.match(/POST/);
    }
  });

  it('accepts feedback, and accepts the same feedback again', async () => {
    const callToken = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
    const call = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${callToken}`)
      .send(warfarinNsaidRequest());
    const card = call.body.cards[0];
    const feedback = {
      feedback: [
        {
          card: card.uuid,
          outcome: 'accepted',
          acceptedSuggestions: [{ id: card.suggestions[0].uuid }],
          outcomeTimestamp: '2026-11-26T10:05:31Z',
        },
      ],
    };
    for (let i = 0; i < 2; i++) {
      const token = await issuer.sign({ aud: `${svcUrl('tiny-order-sign')}/feedback` });
      const res = await request(t.app)
        .post('/cds-services/tiny-order-sign/feedback')
        .set('authorization', `Bearer ${token}`)
        .send(feedback);
      expect(res.status).to.equal(200);
    }
  });

  it('refuses malformed feedback, naming the field', async () => {
    const token = await issuer.sign({ aud: `${svcUrl('tiny-order-sign')}/feedback` });
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${token}`)
      .send({
        feedback: [{ card: 'x', outcome: 'maybe', outcomeTimestamp: '2026-11-26T10:05:31Z' }],
      });
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('feedback[0].outcome');
  });

  it('does not accept a service-call token on the feedback endpoint (aud is the exact URL)', async () => {
    const token = await issuer.sign({ aud: svcUrl('tiny-order-sign') });
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${token}`)
      .send({
        feedback: [{ card: 'x', outcome: 'overridden', outcomeTimestamp: '2026-11-26T10:05:31Z' }],
      });
    expect(res.status).to.equal(401);
  });
});
