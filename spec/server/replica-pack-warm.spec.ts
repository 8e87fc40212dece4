/**
 * A tenant subscribes on replica A to a pack version that replica B has never compiled. B must
 * not compile it on its main thread in one block on its first call for it: the shipped pack
 * (~290 KB of YAML, 1 MB of JSON) held B's event loop 450-550 ms there (longest gap between two
 * runs of a 5 ms timer; a process that had compiled nothing yet, 2-core host at load 3-5),
 * stalling every call in flight on B. Compiled in slices, the longest gap was 70-110 ms on the
 * same host (but 380 ms once at load 10: timing is not asserted, the mechanism is). And B's
 * watcher (`ServiceDirectory.watchSubscriptions`) loads it before any call asks for it.
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import request from 'supertest';
import { threadCompileCounts } from '../../rules/index.ts';
import { buildTestApp, PUBLIC_URL, shippedPackRaw, type TestApp } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

function orderSelect(): Record<string, unknown> {
  const med = (id: string, status: string, code: string, display: string) => ({
    resourceType: 'MedicationRequest',
    id,
    status,
    intent: 'order',
    subject: { reference: 'Patient/pat-1' },
    authoredOn: '2026-12-01',
    medicationCodeableConcept: { coding: [{ system: RXNORM, code, display }] },
  });
  return {
    hook: 'order-select',
    hookInstance: crypto.randomUUID(),
    context: {
      userId: 'Practitioner/example',
      patientId: 'pat-1',
      selections: ['MedicationRequest/draft-1'],
      draftOrders: {
        resourceType: 'Bundle',
        type: 'collection',
        entry: [{ resource: med('draft-1', 'draft', '310965', 'Ibuprofen 200 MG Oral Tablet') }],
      },
    },
    prefetch: {
      patient: { resourceType: 'Patient', id: 'pat-1' },
      medications: {
        resourceType: 'Bundle',
        type: 'searchset',
        entry: [
          { resource: med('warf-1', 'active', '855332', 'Warfarin Sodium 5 MG Oral Tablet') },
        ],
      },
      labs: null,
    },
  };
}

describe('a pack version subscribed on another replica (PostgreSQL)', function () {
  if (!PG_URL) {
    it('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    return;
  }
  this.timeout(120_000);
  const schema = `cellcds_rpw_${crypto.randomBytes(4).toString('hex')}`;
  const env = { CELLCDS_CONTROL_PLANE_URL: PG_URL, CELLCDS_CONTROL_PLANE_SCHEMA: schema };
  const service = 'medication-safety-order-select';
  const url = `${PUBLIC_URL}/cds-services/${service}`;
  let a: TestApp;
  let b: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    issuer = await TestIssuer.create({ iss: `https://ehr-rpw-${schema}.example` });
    [a, b] = await Promise.all([buildTestApp(env), buildTestApp(env)]);
  });
  after(async () => {
    await Promise.all([a.close(), b.close()]);
    const root = new Sequelize(PG_URL, { dialect: 'postgres', logging: false });
    await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await root.close();
  });

  const call = async (app: TestApp) =>
    request(app.app)
      .post(`/cds-services/${service}`)
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(orderSelect());

  const summaries = (res: request.Response) =>
    (res.body as { cards: Array<{ summary: string }> }).cards.map((c) => c.summary);

  /** A copy of the shipped pack under a version no replica has compiled yet. */
  async function uploadNewVersion(tag: string): Promise<string> {
    const pack = structuredClone(shippedPackRaw()) as { version: string };
    // `.ab<hex>`: e-mail shaped after `medication-safety@`, so the log lines must keep the id
    // and version apart for them to survive the log's e-mail scrubber.
    pack.version = `9.0.0-${tag}.ab${crypto.randomBytes(3).toString('hex')}`;
    const up = await a.uploadPack(pack);
    expect(up.status, JSON.stringify(up.body)).to.equal(201);
    return pack.version;
  }

  it("B's first call for it compiles it in slices, not in one block, and answers as A does", async () => {
    const version = await uploadNewVersion('first-call');
    await a.addTenant('hosp', { subscriptions: [{ pack: 'medication-safety', version }], issuer });

    const before = threadCompileCounts();
    const first = await call(b);
    const after = threadCompileCounts();
    expect(first.status, JSON.stringify(first.body)).to.equal(200);
    // Compiled on B's main thread in slices, never in one block (the mechanism is asserted, not
    // the stall: on a 2-core host at load 10 the process itself is descheduled for 300+ ms).
    expect(after.blocking - before.blocking, 'compiled in one block').to.equal(0);
    expect(after.sliced - before.sliced).to.equal(1);

    const onA = await call(a);
    expect(onA.status).to.equal(200);
    expect(summaries(first)).to.have.length.above(0);
    expect(summaries(first)).to.deep.equal(summaries(onA));
  });

  it('B loads a version subscribed on A in the background, before any call for it', async () => {
    const version = await uploadNewVersion('watched');
    const stop = b.deps.directory.watchSubscriptions(b.deps.evaluator, b.deps.log, 100);
    try {
      const res = await request(a.app)
        .put('/admin/tenants/hosp/subscriptions')
        .set('authorization', `Bearer ${a.adminToken}`)
        .send([{ pack: 'medication-safety', version }]);
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const deadline = Date.now() + 60_000;
      const warmedLine = (l: string) =>
        l.includes('pack warmed in background') && l.includes(`"packVersion":"${version}"`);
      while (!b.logLines.some(warmedLine)) {
        expect(
          Date.now(),
          `no background warm logged; B logged: ${b.logLines
            .filter((l) => /warm|background|subscri/.test(l))
            .join(' | ')}`,
        ).to.be.below(deadline);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const line = JSON.parse(
        b.logLines.find((l) => l.includes('pack warmed in background')) ?? '{}',
      ) as Record<string, unknown>;
      expect(line).to.include({ pack: 'medication-safety', packVersion: version });
      expect(line.ms).to.be.a('number');
    } finally {
      await stop();
    }
    // The first call finds it compiled: nothing compiled on its path.
    const before = threadCompileCounts();
    const first = await call(b);
    const after = threadCompileCounts();
    expect(first.status, JSON.stringify(first.body)).to.equal(200);
    expect(after).to.deep.equal(before);
    expect(summaries(first)).to.deep.equal(summaries(await call(a)));
    // The call's log line names the pack and its (e-mail shaped) version, uncensored.
    const hookLines = b.logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l.msg === 'hook call');
    expect(hookLines.at(-1)).to.include({ pack: 'medication-safety', packVersion: version });
  });
});
