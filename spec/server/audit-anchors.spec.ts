/**
 * Kept anchors of the audit chains. The chains are plain sha256 hash chains: an insider with
 * write access to a database file can delete an event, renumber the rest, recompute every hash
 * and move the head row, and the chain verifies again. What catches that is a head taken
 * earlier and kept out of the operator's reach (an anchor): the rewritten chain no longer holds
 * that hash at that seq. These specs run the attack on the real SQLite files (the tenant's store
 * and the control plane), with the chains' own hash function.
 */
import { expect } from 'chai';
import request from 'supertest';
import {
  controlPlaneEvent,
  findFile,
  rewriteChain,
  tenantEvent,
} from '../helpers/audit-rewrite.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';

describe('server/ audit chain anchors', function () {
  this.timeout(60_000);
  let t: TestApp;
  let adminA: string;
  let auditorA: string;
  let auditorB: string;
  let author: string;

  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const as = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);

  beforeEach(async () => {
    t = await buildTestApp();
    await t.addTenant('hosp-a');
    await t.addTenant('hosp-b');
    const issue = async (role: string, tenant?: string) =>
      (await op(request(t.app).post('/admin/tokens')).send({ role, tenant })).body.token as string;
    adminA = await issue('tenant-admin', 'hosp-a');
    auditorA = await issue('auditor', 'hosp-a');
    auditorB = await issue('auditor', 'hosp-b');
    author = await issue('rule-author');
    const store = t.deps.stores.store('hosp-a');
    for (const id of ['inv-1', 'inv-2', 'inv-3']) {
      await store.saveInvocation(invocation(id));
    }
  });
  afterEach(async () => t.close());

  const readRecord = async (id: string) => {
    const res = await as(adminA)(request(t.app).get(`/admin/tenants/hosp-a/invocations/${id}`));
    expect(res.status).to.equal(200);
  };

  describe("a tenant's chain", () => {
    it('gives its head to the roles that may verify it: {chain, seq, hash, at}', async () => {
      await readRecord('inv-1');
      for (const token of [t.adminToken, adminA, auditorA]) {
        const res = await as(token)(request(t.app).get('/admin/tenants/hosp-a/audit/head'));
        expect(res.status).to.equal(200);
        expect(res.body).to.have.all.keys('chain', 'seq', 'hash', 'at');
        expect(res.body.chain).to.equal('tenant:hosp-a');
        expect(res.body.seq).to.equal((await t.deps.stores.store('hosp-a').audit.head()).seq);
        expect(res.body.hash).to.match(/^[0-9a-f]{64}$/);
        expect(Date.parse(res.body.at as string)).to.not.be.NaN;
      }
      for (const token of [auditorB, author]) {
        const res = await as(token)(request(t.app).get('/admin/tenants/hosp-a/audit/head'));
        expect(res.status).to.equal(403);
      }
      const events = await t.deps.controlPlane.audit.list({ type: 'audit.head' });
      expect(events.map((e) => e.tenant)).to.deep.equal(['hosp-a', 'hosp-a', 'hosp-a']);
    });

    it('a deleted record.read, renumbered and rehashed, passes verify alone but fails against an earlier anchor', async () => {
      await readRecord('inv-1');
      await readRecord('inv-2');
      const head = (await as(auditorA)(request(t.app).get('/admin/tenants/hosp-a/audit/head')))
        .body as { seq: number; hash: string };
      const anchor = { seq: head.seq, hash: head.hash };
      const verify = (query = '') =>
        as(auditorA)(request(t.app).get(`/admin/tenants/hosp-a/audit/verify${query}`));

      const before = await verify(`?anchor=${anchor.seq}:${anchor.hash}`);
      expect(before.status).to.equal(200);
      expect(before.body).to.deep.include({ ok: true });
      expect(before.body.anchors).to.deep.equal([{ ...anchor, held: true }]);

      const events = await t.deps.stores.store('hosp-a').audit.list();
      const read = events.find((e) => e.type === 'record.read' && e.detail?.invocation === 'inv-1');
      expect(read).to.not.equal(undefined);
      const file = findFile(t.dataDir, 'hosp-a.sqlite');
      await rewriteChain(
        file,
        read!.seq,
        'at, type, outcome, actor, detail',
        tenantEvent('hosp-a'),
      );

      // The documented limit: the chain alone holds together again.
      const alone = await verify();
      expect(alone.status).to.equal(200);
      expect(alone.body).to.deep.equal({ ok: true, count: anchor.seq - 1 });

      const anchored = await verify(`?anchor=${anchor.seq}:${anchor.hash}`);
      expect(anchored.status).to.equal(200);
      expect(anchored.body).to.deep.include({
        ok: false,
        problem: 'anchor_not_held',
        firstBadSeq: anchor.seq,
      });
      expect(anchored.body.anchors).to.deep.equal([{ ...anchor, held: false }]);
      const audited = await t.deps.controlPlane.audit.list({ type: 'audit.verify' });
      expect(audited.at(-1)).to.deep.include({ outcome: 'failure', tenant: 'hosp-a' });
      expect(audited.at(-1)?.detail).to.deep.include({ anchors: 1 });
    });

    it('an anchor older than a rewrite of later events still holds; the latest one does not', async () => {
      await readRecord('inv-1');
      const headNow = async () => {
        const { seq, hash } = (
          await as(auditorA)(request(t.app).get('/admin/tenants/hosp-a/audit/head'))
        ).body as { seq: number; hash: string };
        return { seq, hash };
      };
      const early = await headNow();
      await readRecord('inv-2');
      await readRecord('inv-3');
      const late = await headNow();
      const file = findFile(t.dataDir, 'hosp-a.sqlite');
      await rewriteChain(
        file,
        late.seq - 1,
        'at, type, outcome, actor, detail',
        tenantEvent('hosp-a'),
      );
      const res = await as(auditorA)(
        request(t.app).get(
          `/admin/tenants/hosp-a/audit/verify?anchor=${early.seq}:${early.hash}&anchor=${late.seq}:${late.hash}`,
        ),
      );
      expect(res.status).to.equal(200);
      expect(res.body).to.deep.include({
        ok: false,
        problem: 'anchor_not_held',
        firstBadSeq: late.seq,
      });
      expect(res.body.anchors).to.deep.equal([
        { ...early, held: true },
        { ...late, held: false },
      ]);
    });

    it('refuses a misspelt anchor parameter rather than verifying without it (400)', async () => {
      const res = await as(auditorA)(
        request(t.app).get(`/admin/tenants/hosp-a/audit/verify?anchors=1:${'a'.repeat(64)}`),
      );
      expect(res.status).to.equal(400);
      expect(res.body.field).to.equal('anchors');
    });

    const bad: Array<[string, string]> = [
      ['no colon', 'anchor=12'],
      ['a short hash', 'anchor=3:abcdef'],
      ['a hash that is not hex', `anchor=3:${'z'.repeat(64)}`],
      ['a negative seq', `anchor=-1:${'a'.repeat(64)}`],
      ['a fractional seq', `anchor=1.5:${'a'.repeat(64)}`],
      [
        'too many anchors',
        Array.from({ length: 101 }, (_, i) => `anchor=${i + 1}:${'a'.repeat(64)}`).join('&'),
      ],
    ];
    for (const [name, query] of bad) {
      it(`refuses an anchor with ${name} (400 naming the anchor)`, async () => {
        const res = await as(auditorA)(
          request(t.app).get(`/admin/tenants/hosp-a/audit/verify?${query}`),
        );
        expect(res.status).to.equal(400);
        expect(res.body.error).to.equal('invalid_request');
        expect(JSON.stringify(res.body)).to.include('anchor');
      });
    }
  });

  describe('the control-plane chain', () => {
    it('gives its head to the platform operator only (as its verify)', async () => {
      const res = await op(request(t.app).get('/admin/audit/head'));
      expect(res.status).to.equal(200);
      expect(res.body).to.have.all.keys('chain', 'seq', 'hash', 'at');
      expect(res.body.chain).to.equal('control-plane');
      expect(res.body.hash).to.match(/^[0-9a-f]{64}$/);
      const verify = await op(request(t.app).get('/admin/audit/verify'));
      expect(verify.status).to.equal(200);
      for (const token of [adminA, auditorA, author]) {
        for (const route of ['/admin/audit/head', '/admin/audit/verify']) {
          expect((await as(token)(request(t.app).get(route))).status, route).to.equal(403);
        }
      }
    });

    it('a deleted records.read, renumbered and rehashed, passes verify alone but fails against an earlier anchor', async () => {
      await readRecord('inv-1');
      await readRecord('inv-2');
      const anchor = (await op(request(t.app).get('/admin/audit/head'))).body as {
        seq: number;
        hash: string;
      };
      const held = await op(
        request(t.app).get(`/admin/audit/verify?anchor=${anchor.seq}:${anchor.hash}`),
      );
      expect(held.body).to.deep.include({ ok: true });
      expect(held.body.anchors).to.deep.equal([{ seq: anchor.seq, hash: anchor.hash, held: true }]);
      const read = (await t.deps.controlPlane.audit.list({ type: 'records.read' }))[0]!;
      const file = findFile(t.dataDir, 'control.sqlite');
      await rewriteChain(
        file,
        read.seq,
        'at, type, outcome, tenant, actor, detail',
        controlPlaneEvent,
      );
      const alone = await op(request(t.app).get('/admin/audit/verify'));
      expect(alone.body).to.include({ ok: true });
      const anchored = await op(
        request(t.app).get(`/admin/audit/verify?anchor=${anchor.seq}:${anchor.hash}`),
      );
      expect(anchored.status).to.equal(200);
      expect(anchored.body).to.deep.include({
        ok: false,
        problem: 'anchor_not_held',
        firstBadSeq: anchor.seq,
      });
    });

    it('refuses a malformed anchor (400)', async () => {
      const res = await op(request(t.app).get('/admin/audit/verify?anchor=nope'));
      expect(res.status).to.equal(400);
      expect(res.body.error).to.equal('invalid_request');
    });
  });
});
