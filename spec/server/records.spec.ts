import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

/** Every file under a folder, recursively (SQLite files, WAL, keyring, backups). */
function filesUnder(dir: string): string[] {
  if (!fs.existsSync(dir)) {
    return [];
  }
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? filesUnder(p) : [p];
  });
}

describe('invocation records, feedback, keys and backups through the API', function () {
  this.timeout(60_000);
  let t: TestApp;
  let a: TestIssuer;
  let b: TestIssuer;
  let adminA: string;
  let auditorA: string;
  let adminB: string;
  const MARKER_NAME = 'Zyxwvut Plantedname';
  const MARKER_MRN = 'MRN-PLANTED-7731';
  const url = (id: string) => `${PUBLIC_URL}/cds-services/${id}`;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const as = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);

  const callA = async (body: Record<string, unknown>, service = 'tiny-order-sign') =>
    request(t.app)
      .post(`/cds-services/${service}`)
      .set('authorization', `Bearer ${await a.sign({ aud: url(service) })}`)
      .send(body);

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    a = await t.addTenant('tenant-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    b = await t.addTenant('tenant-b', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    const issue = async (role: string, tenant: string) =>
      (await op(request(t.app).post('/admin/tokens')).send({ role, tenant })).body.token as string;
    adminA = await issue('tenant-admin', 'tenant-a');
    auditorA = await issue('auditor', 'tenant-a');
    adminB = await issue('tenant-admin', 'tenant-b');
  });
  after(async () => t.close());

  let invocationId = '';
  let cardUuid = '';
  let suggestionUuid = '';

  it("persists every hook call before answering, readable by the tenant's own admin", async () => {
    const body = warfarinNsaidRequest();
    const res = await callA(body);
    expect(res.status).to.equal(200);
    cardUuid = res.body.cards[0].uuid;
    suggestionUuid = res.body.cards[0].suggestions[0].uuid;
    const list = await as(adminA)(request(t.app).get('/admin/tenants/tenant-a/invocations'));
    expect(list.status).to.equal(200);
    const rec = list.body.invocations.find((i: { cardUuids: string[] }) =>
      i.cardUuids.includes(cardUuid),
    );
    expect(rec).to.include({
      service: 'tiny-order-sign',
      hook: 'order-sign',
      hookInstance: body.hookInstance,
    });
    expect(rec.pack).to.include({ id: 'tiny', version: '1.0.0' });
    expect(rec.pack.hash).to.match(/^[0-9a-f]{64}$/);
    expect(rec.suggestionUuids).to.include(suggestionUuid);
    expect(rec).to.not.have.property('secret');
    invocationId = rec.id;
    const one = await as(auditorA)(
      request(t.app).get(`/admin/tenants/tenant-a/invocations/${invocationId}`),
    );
    expect(one.status).to.equal(200);
    expect(one.body.secret.context.patientId).to.equal('pat-1');
    expect(one.body.secret.cards[0].uuid).to.equal(cardUuid);
    expect(one.body.secret.trace[0]).to.include({ ruleId: 'warfarin-nsaid', status: 'fired' });
  });

  it("refuses decrypted content to a platform operator (403) and to another tenant's admin", async () => {
    const refused = await op(
      request(t.app).get(`/admin/tenants/tenant-a/invocations/${invocationId}`),
    );
    expect(refused.status).to.equal(403);
    // Says which permission the token lacks, so the operator knows to ask the tenant.
    expect(refused.body).to.deep.equal({
      error: 'forbidden',
      message: 'role platform-operator may not records:read',
    });
    expect(
      (await op(request(t.app).post(`/admin/tenants/tenant-a/invocations/${invocationId}/replay`)))
        .status,
    ).to.equal(403);
    expect(
      (await as(adminB)(request(t.app).get(`/admin/tenants/tenant-a/invocations/${invocationId}`)))
        .status,
    ).to.equal(403);
    expect(
      (await as(adminB)(request(t.app).get('/admin/tenants/tenant-a/invocations'))).status,
    ).to.equal(403);
    // B's own store does not have A's record either.
    expect(
      (await as(adminB)(request(t.app).get(`/admin/tenants/tenant-b/invocations/${invocationId}`)))
        .status,
    ).to.equal(404);
  });

  it('replays a record with its stored pack version and says the cards match', async () => {
    const res = await as(adminA)(
      request(t.app).post(`/admin/tenants/tenant-a/invocations/${invocationId}/replay`),
    );
    expect(res.status).to.equal(200);
    expect(res.body.matches).to.equal(true);
    expect(res.body.pack).to.include({ id: 'tiny', version: '1.0.0' });
    expect(
      res.body.trace.find((e: { ruleId: string }) => e.ruleId === 'warfarin-nsaid').status,
    ).to.equal('fired');
  });

  it("replays with the pack this process already compiled for calls: the stored pack is not read, parsed and hashed again on the main thread (a replay flood stalled every tenant's calls)", async () => {
    const packs = t.deps.controlPlane.packs;
    const get = packs.get.bind(packs);
    let reads = 0;
    packs.get = async (...args: Parameters<typeof get>) => {
      reads++;
      return get(...args);
    };
    try {
      for (let i = 0; i < 3; i++) {
        const res = await as(adminA)(
          request(t.app).post(`/admin/tenants/tenant-a/invocations/${invocationId}/replay`),
        );
        expect(res.status).to.equal(200);
        expect(res.body.matches).to.equal(true);
      }
    } finally {
      packs.get = get;
    }
    expect(reads).to.equal(0);
  });

  it('stores feedback linked to the card, once for repeats; refuses cards the tenant was never sent', async () => {
    const fb = {
      feedback: [
        {
          card: cardUuid,
          outcome: 'accepted',
          acceptedSuggestions: [{ id: suggestionUuid }],
          outcomeTimestamp: '2026-11-26T10:05:31Z',
        },
      ],
    };
    for (let i = 0; i < 2; i++) {
      const res = await request(t.app)
        .post('/cds-services/tiny-order-sign/feedback')
        .set(
          'authorization',
          `Bearer ${await a.sign({ aud: `${url('tiny-order-sign')}/feedback` })}`,
        )
        .send(fb);
      expect(res.status).to.equal(200);
    }
    const one = await as(adminA)(
      request(t.app).get(`/admin/tenants/tenant-a/invocations/${invocationId}`),
    );
    expect(one.body.feedback).to.have.length(1);
    expect(one.body.feedback[0]).to.include({ card: cardUuid, outcome: 'accepted' });
    // Tenant B, same service id, A's card: never sent to B.
    const cross = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${await b.sign({ aud: `${url('tiny-order-sign')}/feedback` })}`)
      .send(fb);
    expect(cross.status).to.equal(404);
    const unknown = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${await a.sign({ aud: `${url('tiny-order-sign')}/feedback` })}`)
      .send({
        feedback: [
          {
            card: crypto.randomUUID(),
            outcome: 'overridden',
            outcomeTimestamp: '2026-11-26T10:05:31Z',
          },
        ],
      });
    expect(unknown.status).to.equal(404);
  });

  it('refuses feedback accepting a suggestion that invocation never sent (404, nothing stored)', async () => {
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${await a.sign({ aud: `${url('tiny-order-sign')}/feedback` })}`)
      .send({
        feedback: [
          {
            card: cardUuid,
            outcome: 'accepted',
            acceptedSuggestions: [{ id: suggestionUuid }, { id: crypto.randomUUID() }],
            outcomeTimestamp: '2026-11-26T10:07:00Z',
          },
        ],
      });
    expect(res.status).to.equal(404);
    expect(res.body).to.deep.include({
      message: 'suggestion not found: 1 feedback item refused',
      field: 'feedback[0].acceptedSuggestions[1]',
    });
    const one = await as(adminA)(
      request(t.app).get(`/admin/tenants/tenant-a/invocations/${invocationId}`),
    );
    expect(one.body.feedback).to.have.length(1);
  });

  it('keeps planted PHI out of every file on disk, the backup and the logs', async () => {
    const res = await callA(
      patientViewRequest(`${MARKER_NAME} ${MARKER_MRN}`),
      'tiny-patient-view',
    );
    expect(res.status).to.equal(200);
    const backup = await op(request(t.app).post('/admin/tenants/tenant-a/backups'));
    expect(backup.status).to.equal(201);
    const files = filesUnder(t.dataDir);
    expect(files.some((f) => f.endsWith('tenant-a.sqlite'))).to.equal(true);
    expect(files.some((f) => f.includes(`${path.sep}backups${path.sep}`))).to.equal(true);
    for (const file of files) {
      const bytes = fs.readFileSync(file);
      for (const marker of [MARKER_NAME, MARKER_MRN, 'pat-1']) {
        expect(
          bytes.includes(Buffer.from(marker)),
          `${marker} in ${path.relative(t.dataDir, file)}`,
        ).to.equal(false);
      }
    }
    const log = t.logLines.join('\n');
    expect(log).to.not.include(MARKER_NAME);
    expect(log).to.not.include(MARKER_MRN);
  });

  it('rotates the tenant key while calls go on; every record stays readable', async () => {
    for (let i = 0; i < 20; i++) {
      expect((await callA(warfarinNsaidRequest())).status).to.equal(200);
    }
    const rot = await op(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({});
    expect(rot.status).to.equal(202);
    const jobId = rot.body.id as string;
    expect(jobId).to.match(/^rewrap\.tenant-a\./);
    // Calls during the rewrap all succeed.
    for (let i = 0; i < 10; i++) {
      expect((await callA(warfarinNsaidRequest())).status).to.equal(200);
    }
    let job = rot.body;
    for (let i = 0; i < 200 && job.status === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 50));
      job = (await op(request(t.app).get(`/admin/jobs/${jobId}`))).body;
    }
    expect(job.status).to.equal('done');
    expect(job.done).to.equal(job.total);
    expect(job).to.include.keys('rate', 'etaSeconds');
    const keys = await op(request(t.app).get('/admin/tenants/tenant-a/keys'));
    expect(keys.body.primary).to.equal(2);
    const list = await as(adminA)(
      request(t.app).get('/admin/tenants/tenant-a/invocations?limit=1000'),
    );
    for (const inv of list.body.invocations) {
      const r = await as(adminA)(
        request(t.app).get(`/admin/tenants/tenant-a/invocations/${inv.id as string}`),
      );
      expect(r.status).to.equal(200);
    }
    // Tenant-scoped roles cannot rotate keys.
    expect(
      (await as(adminA)(request(t.app).post('/admin/tenants/tenant-a/keys/rotate')).send({}))
        .status,
    ).to.equal(403);
  });

  it("verifies the tenant's audit chain", async () => {
    const res = await as(auditorA)(request(t.app).get('/admin/tenants/tenant-a/audit/verify'));
    expect(res.status).to.equal(200);
    expect(res.body.ok).to.equal(true);
    expect(res.body.count).to.be.greaterThan(3);
  });

  it('deprovisions a tenant by crypto-shredding: no key material left, its backup no longer opens', async () => {
    expect((await callA(warfarinNsaidRequest())).status).to.equal(200);
    const backup = await op(request(t.app).post('/admin/tenants/tenant-a/backups'));
    expect(backup.status).to.equal(201);
    const del = await op(request(t.app).delete('/admin/tenants/tenant-a'));
    expect(del.status).to.equal(200);
    expect(del.body).to.include({ tenantKeyDestroyed: true, storeDeleted: true });
    expect((await op(request(t.app).get('/admin/tenants/tenant-a'))).status).to.equal(404);
    // The keyring keeps only a tombstone (id and time, no key) so a late call cannot silently
    // create a fresh key; the tenant's key itself is gone.
    for (const file of filesUnder(path.join(t.dataDir, 'keys')).filter((f) =>
      f.endsWith('.json'),
    )) {
      const ring = JSON.parse(fs.readFileSync(file, 'utf8')) as {
        tenants: Record<string, unknown>;
        destroyed: Record<string, string>;
      };
      expect(ring.tenants).to.not.have.property('tenant-a');
      expect(ring.tenants).to.have.property('tenant-b');
      expect(ring.destroyed['tenant-a']).to.be.a('string');
    }
    expect(
      filesUnder(t.dataDir).some(
        (f) => /tenant-a\.sqlite/.test(path.basename(f)) && !f.includes('backups'),
      ),
    ).to.equal(false);
    // A's token is dead, B is unaffected.
    expect((await callA(warfarinNsaidRequest())).status).to.equal(401);
    const resB = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await b.sign({ aud: url('tiny-order-sign') })}`)
      .send(warfarinNsaidRequest());
    expect(resB.status).to.equal(200);
    // The id is retired: its old backup is not restored, even unauthenticated (a store for
    // an unregistered tenant would be picked up by a later tenant under the same id), and
    // nothing is written. Its records could not be opened anyway: their keys are destroyed.
    for (const allowUnauthenticated of [false, true]) {
      const refused = await op(request(t.app).post('/admin/restores')).send({
        backup: path.relative(t.deps.backupDir, backup.body.path as string),
        tenant: 'tenant-a',
        allowUnauthenticated,
      });
      expect(refused.status, JSON.stringify(refused.body)).to.equal(409);
      expect(refused.body.message).to.include('tenant tenant-a was deprovisioned on');
    }
    expect(await t.deps.stores.listTenants()).to.not.include('tenant-a');
  });

  it('refuses a restore path outside the region backup folder', async () => {
    const res = await op(request(t.app).post('/admin/restores')).send({ backup: '../../etc' });
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('backup');
  });
});
