import { expect } from 'chai';
import request from 'supertest';
import { createApp } from '../../server/app.ts';
import { buildDeps } from '../../server/bootstrap.ts';
import { loadConfig } from '../../server/config.ts';
import type { Deps } from '../../server/context.ts';
import { createLogger } from '../../server/logger.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';

interface JobBody {
  id: string;
  status: string;
  done: number;
  total: number;
}

interface LogLine {
  level: string;
  msg: string;
  jobId?: string;
  tenant?: string;
  kind?: string;
  status?: string;
  done?: number;
  total?: number;
}

/** The value of `cellcds_rewrap_jobs_finished_total{kind, status}` in a scrape (0 if absent). */
function finished(metrics: string, kind: string, status: string): number {
  const line = metrics
    .split('\n')
    .find(
      (l) =>
        l.startsWith('cellcds_rewrap_jobs_finished_total{') &&
        l.includes(`kind="${kind}"`) &&
        l.includes(`status="${status}"`),
    );
  return line ? Number(line.split(' ').at(-1)) : 0;
}

const parse = (lines: string[]): LogLine[] => lines.map((l) => JSON.parse(l) as LogLine);

/**
 * Key jobs are observable: each finished DEK and KEK job is counted once in
 * `cellcds_rewrap_jobs_finished_total{kind,status}`, and their start, resumption (after a
 * restart) and end are logged (info) with job id, tenant, kind and progress. Real rotations
 * through the admin API, real stores, /metrics over HTTP.
 */
describe('key job metrics and log lines', function () {
  this.timeout(120_000);
  const aud = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  let t: TestApp;
  afterEach(async () => {
    await t.close();
  });

  async function tenantWithRecords(app: TestApp, id: string, records: number): Promise<void> {
    expect((await app.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    const issuer = await app.addTenant(id, { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    for (let i = 0; i < records; i++) {
      const res = await request(app.app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${await issuer.sign({ aud })}`)
        .send(warfarinNsaidRequest());
      expect(res.status).to.equal(200);
    }
  }

  /**
   * Polls job `id` until it stops, then until its end is logged in `logLines` (the runner sees
   * the end right after the job's last batch, a moment after the API does).
   */
  async function waitDone(
    app: TestApp['app'],
    token: string,
    id: string,
    logLines: string[],
  ): Promise<JobBody> {
    let job: JobBody = { id, status: 'running', done: 0, total: 0 };
    for (let i = 0; i < 500 && job.status === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 20));
      job = (await request(app).get(`/admin/jobs/${id}`).set('authorization', `Bearer ${token}`))
        .body as JobBody;
    }
    const ended = () => parse(logLines).some((l) => l.msg === 'key job ended' && l.jobId === id);
    for (let i = 0; i < 100 && !ended(); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    return job;
  }

  it('counts finished DEK and KEK jobs once each in /metrics and logs their start and end', async () => {
    t = await buildTestApp();
    await tenantWithRecords(t, 'jobs-a', 3);
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    const scrape = async () => (await request(t.app).get('/metrics')).text;
    expect(finished(await scrape(), 'dek-rewrap', 'done')).to.equal(0);

    const rot = await op(request(t.app).post('/admin/tenants/jobs-a/keys/rotate')).send({});
    expect(rot.status).to.equal(202);
    const dek = await waitDone(t.app, t.adminToken, (rot.body as JobBody).id, t.logLines);
    expect(dek.status).to.equal('done');
    // Scraped twice: counted once.
    expect(finished(await scrape(), 'dek-rewrap', 'done')).to.equal(1);
    expect(finished(await scrape(), 'dek-rewrap', 'done')).to.equal(1);

    const kekRot = await op(
      request(t.app).post(`/admin/regions/${t.deps.region.id}/kek/rotate`),
    ).send({});
    expect(kekRot.status).to.equal(202);
    const kek = await waitDone(t.app, t.adminToken, (kekRot.body as JobBody).id, t.logLines);
    expect(kek.status).to.equal('done');
    expect(finished(await scrape(), 'kek-rewrap', 'done')).to.equal(1);
    expect(finished(await scrape(), 'dek-rewrap', 'done')).to.equal(1);

    const lines = parse(t.logLines);
    const started = lines.filter((l) => l.msg === 'key job started');
    expect(started.map((l) => [l.level, l.jobId, l.kind])).to.deep.equal([
      ['info', dek.id, 'dek-rewrap'],
      ['info', kek.id, 'kek-rewrap'],
    ]);
    expect(started[0]).to.include({ tenant: 'jobs-a', done: 0, total: 3 });
    const ended = lines.filter((l) => l.msg === 'key job ended');
    expect(ended.map((l) => [l.level, l.jobId, l.kind, l.status])).to.deep.equal([
      ['info', dek.id, 'dek-rewrap', 'done'],
      ['info', kek.id, 'kek-rewrap', 'done'],
    ]);
    expect(ended[0]).to.include({ tenant: 'jobs-a', done: 3, total: 3 });
  });

  it('counts a superseded DEK job and logs its end', async () => {
    t = await buildTestApp({
      CELLCDS_REWRAP_SCHEDULED_BATCH: '1',
      CELLCDS_REWRAP_THROTTLE_MS: '200',
    });
    await tenantWithRecords(t, 'jobs-s', 6);
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    const first = (await op(request(t.app).post('/admin/tenants/jobs-s/keys/rotate')).send({}))
      .body as JobBody;
    const second = await op(request(t.app).post('/admin/tenants/jobs-s/keys/rotate')).send({
      emergency: true,
    });
    expect(second.status).to.equal(202);
    const done = await waitDone(t.app, t.adminToken, (second.body as JobBody).id, t.logLines);
    expect(done.status).to.equal('done');
    // The superseded runner notices at its next batch (after its throttle).
    let metrics = '';
    for (let i = 0; i < 50; i++) {
      metrics = (await request(t.app).get('/metrics')).text;
      if (finished(metrics, 'dek-rewrap', 'superseded') > 0) {
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(finished(metrics, 'dek-rewrap', 'superseded')).to.equal(1);
    expect(finished(metrics, 'dek-rewrap', 'done')).to.equal(1);
    const ended = parse(t.logLines).filter((l) => l.msg === 'key job ended');
    expect(ended.find((l) => l.jobId === first.id)).to.include({ status: 'superseded' });
  });

  it('logs a job resumed after a restart, at its checkpoint, and its end', async () => {
    t = await buildTestApp({
      CELLCDS_REWRAP_SCHEDULED_BATCH: '2',
      CELLCDS_REWRAP_THROTTLE_MS: '60000',
    });
    await tenantWithRecords(t, 'jobs-r', 12);
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    const rot = await op(request(t.app).post('/admin/tenants/jobs-r/keys/rotate')).send({});
    let job = rot.body as JobBody;
    for (let i = 0; i < 200 && job.done === 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      job = (await op(request(t.app).get(`/admin/jobs/${job.id}`))).body as JobBody;
    }
    expect(job).to.include({ status: 'running', done: 8, total: 12 });
    // Stop the process (the job stays running in the store), start another on the same data.
    // (buildTestApp's deps are buildDeps', which close; t.close would also remove the data.)
    await (t.deps as Deps & { close(): Promise<void> }).close();
    const logLines: string[] = [];
    const config = loadConfig({
      CELLCDS_DATA_DIR: t.dataDir,
      CELLCDS_PUBLIC_URL: PUBLIC_URL,
      CELLCDS_ADMIN_TOKEN: t.adminToken,
      CELLCDS_REWRAP_THROTTLE_MS: '0',
    });
    const log = createLogger({
      level: 'info',
      destination: { write: (line: string) => void logLines.push(line) },
    });
    const deps = await buildDeps(config, log);
    const closeFirst = t.close.bind(t);
    t.close = async () => {
      await deps.close();
      await closeFirst().catch(() => undefined);
    };
    const app = createApp(deps);
    const done = await waitDone(app, t.adminToken, job.id, logLines);
    expect(done).to.include({ status: 'done', done: 12, total: 12 });
    const lines = parse(logLines);
    const resumed = lines.filter((l) => l.msg === 'key job resumed');
    expect(resumed).to.have.length(1);
    expect(resumed[0]).to.include({
      level: 'info',
      jobId: job.id,
      tenant: 'jobs-r',
      kind: 'dek-rewrap',
      done: 8,
      total: 12,
    });
    const ended = lines.filter((l) => l.msg === 'key job ended');
    expect(ended).to.have.length(1);
    expect(ended[0]).to.include({ jobId: job.id, status: 'done', done: 12, total: 12 });
    expect(finished((await request(app).get('/metrics')).text, 'dek-rewrap', 'done')).to.equal(1);
  });
});
