import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';

/** The value of the sample `name` whose labels include every one of `labels` (undefined if none). */
function sample(
  text: string,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) {
      continue;
    }
    const have = m[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => have.split(',').includes(`${k}="${v}"`))) {
      return Number(m[3]);
    }
  }
  return undefined;
}

/**
 * Metrics of the store, the evaluation worker pool and the open stores after real hook calls:
 * the store write latency histogram (per region and record kind, never per tenant), the worker
 * pool's gauges and counters, and the open tenant stores of the region.
 */
describe('metrics: store writes, evaluation workers, open stores', function () {
  this.timeout(60_000);
  let t: TestApp;
  const aud = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  const scrape = async () => (await request(t.app).get('/metrics')).text;

  before(async () => {
    t = await buildTestApp();
  });
  after(async () => t.close());

  it('shows the store write latency, the worker pool and the open stores after hook calls', async () => {
    const before = await scrape();
    expect(sample(before, 'cellcds_eval_workers', { region: 'local' })).to.equal(2);
    expect(sample(before, 'cellcds_eval_workers_busy')).to.equal(0);
    expect(sample(before, 'cellcds_eval_queue_depth')).to.equal(0);
    expect(sample(before, 'cellcds_eval_workers_replaced_total')).to.equal(0);
    expect(sample(before, 'cellcds_eval_workers_crashed_total')).to.equal(0);
    expect(sample(before, 'cellcds_tenant_stores_open', { region: 'local' })).to.equal(0);
    const writesBefore =
      sample(before, 'cellcds_store_write_duration_seconds_count', { record: 'invocation' }) ?? 0;

    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    const issuer = await t.addTenant('obs-a', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    const cardUuids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const res = await request(t.app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${await issuer.sign({ aud })}`)
        .send(warfarinNsaidRequest());
      expect(res.status).to.equal(200);
      cardUuids.push(...(res.body.cards as Array<{ uuid: string }>).map((c) => c.uuid));
    }
    expect(cardUuids.length).to.be.greaterThan(0);
    const feedback = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${await issuer.sign({ aud: `${aud}/feedback` })}`)
      .send({
        feedback: [
          { card: cardUuids[0], outcome: 'overridden', outcomeTimestamp: new Date().toISOString() },
        ],
      });
    expect(feedback.status).to.equal(200);

    const after = await scrape();
    const labels = { region: 'local', record: 'invocation' };
    expect(sample(after, 'cellcds_store_write_duration_seconds_count', labels)).to.equal(
      writesBefore + 3,
    );
    const sum = sample(after, 'cellcds_store_write_duration_seconds_sum', labels) ?? -1;
    expect(sum).to.be.above(0).and.below(10);
    expect(
      sample(after, 'cellcds_store_write_duration_seconds_bucket', { ...labels, le: '+Inf' }),
    ).to.equal(writesBefore + 3);
    expect(
      sample(after, 'cellcds_store_write_duration_seconds_count', { record: 'feedback' }),
    ).to.equal(1);
    expect(sample(after, 'cellcds_tenant_stores_open', { region: 'local' })).to.equal(1);
    expect(sample(after, 'cellcds_eval_workers_busy')).to.equal(0);
    expect(sample(after, 'cellcds_eval_queue_depth')).to.equal(0);
    expect(sample(after, 'cellcds_eval_workers_crashed_total')).to.equal(0);
    // Per region, never per tenant.
    expect(after).not.to.include('obs-a');
  });
});
