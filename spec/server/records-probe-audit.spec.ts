import crypto from 'node:crypto';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { StoredAuditEvent } from '../../tenants/index.ts';

/**
 * A read of a record that is not there is a probe, and is audited like the read it tried to
 * be: `records.read` (or `records.replay`) with outcome failure, the actor, the tenant, the id
 * asked for (only when it is a uuid, else its length) and the reason.
 */
describe('record reads and replays of a record that is not there are audited', function () {
  this.timeout(60_000);
  let t: TestApp;
  let adminA: string;
  let auditorA: string;
  let auditorAId: string;
  const MISSING = '00000000-0000-0000-0000-000000000001';
  const as = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);
  const op = (r: request.Test) => as(t.adminToken)(r);

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    await t.addTenant('acme', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    const issue = async (role: string) => {
      const res = await op(request(t.app).post('/admin/tokens')).send({ role, tenant: 'acme' });
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
      return res.body as { token: string; id: string };
    };
    adminA = (await issue('tenant-admin')).token;
    const auditor = await issue('auditor');
    auditorA = auditor.token;
    auditorAId = auditor.id;
  });
  after(async () => t.close());

  /** The control-plane events of `type` for acme written since `since` (a seq). */
  const eventsSince = async (type: string, since: number): Promise<StoredAuditEvent[]> =>
    (await t.deps.controlPlane.audit.list({ tenant: 'acme', type })).filter((e) => e.seq > since);
  const lastSeq = async (): Promise<number> =>
    Math.max(0, ...(await t.deps.controlPlane.audit.list({})).map((e) => e.seq));

  it('audits a GET of a record id that does not exist (404) as a failed records.read', async () => {
    const since = await lastSeq();
    const res = await as(auditorA)(
      request(t.app).get(`/admin/tenants/acme/invocations/${MISSING}`),
    );
    expect(res.status).to.equal(404);
    const events = await eventsSince('records.read', since);
    expect(events).to.have.length(1);
    expect(events[0]).to.deep.include({
      type: 'records.read',
      outcome: 'failure',
      tenant: 'acme',
      actor: `auditor:${auditorAId}`,
    });
    expect(events[0]?.detail).to.deep.include({ reason: 'not_found', invocation: MISSING });
  });

  it('audits a replay of a record id that does not exist as a failed records.replay', async () => {
    const since = await lastSeq();
    const res = await as(adminA)(
      request(t.app).post(`/admin/tenants/acme/invocations/${MISSING}/replay`),
    );
    expect(res.status).to.equal(404);
    const events = await eventsSince('records.replay', since);
    expect(events).to.have.length(1);
    expect(events[0]).to.deep.include({ outcome: 'failure', tenant: 'acme' });
    expect(events[0]?.actor).to.match(/^tenant-admin:/);
    expect(events[0]?.detail).to.deep.include({ reason: 'not_found', invocation: MISSING });
    // Not also audited as a read.
    expect(await eventsSince('records.read', since)).to.deep.equal([]);
  });

  for (const [name, id, status, reason] of [
    [
      'a well-formed id that is not a uuid (caller text: an MRN)',
      'MRN-PLANTED-7731',
      404,
      'not_found',
    ],
    ['an id that is not a record id at all', 'bad|id', 400, 'invalid_id'],
  ] as const) {
    it(`audits ${name} by its length only, never the text nor a digest of it`, async () => {
      const since = await lastSeq();
      const res = await as(auditorA)(
        request(t.app).get(`/admin/tenants/acme/invocations/${encodeURIComponent(id)}`),
      );
      expect(res.status).to.equal(status);
      const events = await eventsSince('records.read', since);
      expect(events).to.have.length(1);
      expect(events[0]?.outcome).to.equal('failure');
      expect(events[0]?.detail).to.deep.equal({ reason, invocationLength: id.length });
      // Nor a digest of it: an unkeyed hash of an MRN is reversed by trying every MRN.
      const text = JSON.stringify(events[0]);
      expect(text).to.not.include(id);
      const digest = crypto.createHash('sha256').update(id).digest('hex');
      for (let i = 0; i + 8 <= digest.length; i += 8) {
        expect(text).to.not.include(digest.slice(i, i + 8));
      }
    });
  }

  it('still audits a found record as a successful records.read (and a replay once)', async () => {
    const issuer = await t.addTenant('acme-2', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    const admin2 = (
      await op(request(t.app).post('/admin/tokens')).send({
        role: 'tenant-admin',
        tenant: 'acme-2',
      })
    ).body.token as string;
    const call = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set(
        'authorization',
        `Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/tiny-order-sign` })}`,
      )
      .send(warfarinNsaidRequest());
    expect(call.status).to.equal(200);
    const list = await as(admin2)(request(t.app).get('/admin/tenants/acme-2/invocations'));
    const id = list.body.invocations[0].id as string;
    const since = await lastSeq();
    const replay = await as(admin2)(
      request(t.app).post(`/admin/tenants/acme-2/invocations/${id}/replay`),
    );
    expect(replay.status).to.equal(200);
    const events = (await t.deps.controlPlane.audit.list({ tenant: 'acme-2' })).filter(
      (e) => e.seq > since,
    );
    expect(events.map((e) => [e.type, e.outcome])).to.deep.equal([
      ['records.read', 'success'],
      ['records.replay', 'success'],
    ]);
  });
});
