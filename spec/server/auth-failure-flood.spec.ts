/**
 * A flood of refused credentials: each refusal used to cost a durable control-plane write.
 * Beyond CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND, refusals are audited as counts, so the audit
 * trail still adds up to every refusal, the metrics count each one, and every answer is still
 * a bare 401.
 */
import { expect } from 'chai';
import request from 'supertest';
import { buildEvidence } from '../../server/evidence.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { warfarinNsaidRequest } from '../helpers/packs.ts';

const CLIENT_FLOOD = 40;
const OPERATOR_FLOOD = 12;
const BUDGET = 5;

describe('server/ a flood of refused tokens is audited within a budget', () => {
  let t: TestApp;
  before(async () => {
    t = await buildTestApp({ CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND: String(BUDGET) });
  });
  after(async () => {
    await t.close();
  });

  it('answers every one 401, counts each, and audits them all: one by one, then as counts', async () => {
    const from = new Date(Date.now() - 1000);
    const responses = await Promise.all([
      ...Array.from({ length: CLIENT_FLOOD }, () =>
        request(t.app)
          .post('/cds-services/anything')
          .set('authorization', 'Bearer not.a.jwt')
          .send(warfarinNsaidRequest()),
      ),
      ...Array.from({ length: OPERATOR_FLOOD }, () =>
        request(t.app).get('/admin/tenants').set('authorization', 'Bearer no-such-operator'),
      ),
    ]);
    expect(responses.map((r) => r.status)).to.deep.equal(
      Array.from({ length: CLIENT_FLOOD + OPERATOR_FLOOD }, () => 401),
    );
    await t.deps.failureAudit.flush();

    const single = await t.deps.controlPlane.audit.list({ type: 'auth.failure' });
    const counted = await t.deps.controlPlane.audit.list({ type: 'auth.failure.suppressed' });
    // The flood may straddle a second or two: each second audits at most BUDGET one by one.
    expect(single.length).to.be.at.least(1).and.below(CLIENT_FLOOD);
    expect(counted.length).to.be.at.least(1);
    const countedTotal = counted.reduce((n, e) => n + Number(e.detail?.count), 0);
    expect(single.length + countedTotal).to.equal(CLIENT_FLOOD);
    for (const e of counted) {
      expect(e.outcome).to.equal('failure');
      expect(e.detail).to.have.keys(['reason', 'count', 'from', 'to']);
      expect(e.detail?.reason).to.equal(single[0]?.detail?.reason);
      expect(JSON.stringify(e)).to.not.include('not.a.jwt');
    }

    const operators = await t.deps.controlPlane.audit.list({ type: 'admin.auth' });
    const operatorCounts = await t.deps.controlPlane.audit.list({ type: 'admin.auth.suppressed' });
    expect(
      operators.filter((e) => e.outcome === 'failure').length +
        operatorCounts.reduce((n, e) => n + Number(e.detail?.count), 0),
    ).to.equal(OPERATOR_FLOOD);

    const metrics = await request(t.app).get('/metrics');
    const refused = [...metrics.text.matchAll(/^cellcds_auth_failures_total\{[^}]*\} (\d+)/gm)]
      .map((m) => Number(m[1]))
      .reduce((a, b) => a + b, 0);
    expect(refused).to.equal(CLIENT_FLOOD + OPERATOR_FLOOD);

    // The evidence report adds the counts back up.
    const report = await buildEvidence({
      controlPlane: t.deps.controlPlane,
      matrix: t.deps.matrix,
      from,
      to: new Date(Date.now() + 1000),
    });
    expect(report.failedAuth.clients.total).to.equal(CLIENT_FLOOD);
    expect(report.failedAuth.operators.total).to.equal(OPERATOR_FLOOD);
    expect(report.failedAuth.total).to.equal(CLIENT_FLOOD + OPERATOR_FLOOD);
    expect(report.adminActivity.actions.map((e) => e.type)).to.not.include('admin.auth.suppressed');
  });

  it('refuses a budget that is not a positive integer', async () => {
    for (const bad of ['0', '-1', '2.5', 'many']) {
      const err = await buildTestApp({ CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND: bad }).then(
        (app) => app.close().then(() => undefined),
        (e: unknown) => e,
      );
      expect(String(err)).to.include('CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND');
    }
  });
});
