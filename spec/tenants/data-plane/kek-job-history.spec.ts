/**
 * An older KEK rewrap job stays findable once a newer rotation ran (an engineer checking
 * yesterday's rotation): from this process's bounded history, or, when this process did not run
 * it, reported done; either way naming the job of the next KEK version (`supersededBy`). A
 * version the provider never held: not found.
 */
import { expect } from 'chai';
import { NotFoundError } from '../../../tenants/index.ts';
import { forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

forEachBackend('tenants/ data plane: older KEK rewrap jobs', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
    await env.stores.store('acme').saveInvocation(invocation('inv-1'));
  });
  afterEach(async () => {
    await env.close();
  });

  const rotate = async () => {
    const job = await env.stores.rotateKek({ actor: 'op' });
    const done = await env.stores.waitForJob(job.id);
    expect(done.status).to.equal('done');
    return done;
  };

  it('finds a job this process ran after a newer rotation, as it finished, naming its successor', async () => {
    const first = await rotate();
    const second = await rotate();
    const found = await env.stores.findJob(first.id);
    expect(found).to.deep.equal({ ...first, supersededBy: second.id });
    expect(found).to.include({ id: `kek.${env.region}.2`, status: 'done', done: 1, total: 1 });
    expect(await env.stores.waitForJob(first.id)).to.deep.equal(found);
    expect(await env.stores.findJob(second.id)).to.deep.equal(second);
  });

  it('after a restart: a superseded version is reported done, the current one as before', async () => {
    await rotate();
    const second = await rotate();
    await rotate();
    const restarted = await env.reopen();
    const described = await env.provider.describe();
    const v2 = described.keks.find((k) => k.version === 2)!;
    expect(v2.status).to.not.equal('primary');
    const old = await restarted.findJob(`kek.${env.region}.2`);
    expect(old).to.deep.equal({
      id: `kek.${env.region}.2`,
      region: env.region,
      kind: 'kek-rewrap',
      status: 'done',
      emergency: false,
      done: 0,
      total: 0,
      rate: 0,
      etaSeconds: 0,
      startedAt: v2.createdAt,
      updatedAt: v2.createdAt,
      supersededBy: second.id,
    });
    expect(await restarted.waitForJob(`kek.${env.region}.2`)).to.deep.equal(old);
    expect(await restarted.findJob(`kek.${env.region}.4`)).to.include({ status: 'done' });
    expect(await restarted.findJob(`kek.${env.region}.4`)).to.not.have.property('supersededBy');
  });

  it('a version the provider never had, or another region, stays not found', async () => {
    await rotate();
    await rotate();
    for (const id of [
      `kek.${env.region}.0`,
      `kek.${env.region}.4`,
      `kek.${env.region}.99`,
      'kek.other-region.2',
    ]) {
      expect(await env.stores.findJob(id), id).to.equal(undefined);
      expect(await rejection(env.stores.waitForJob(id)), id).to.be.instanceOf(NotFoundError);
    }
  });

  it('keeps the last 20 jobs it ran; an older one is answered from the provider', async function () {
    this.timeout(120_000);
    const jobs = [];
    for (let i = 0; i < 22; i++) {
      jobs.push(await rotate());
    }
    const last = jobs[21]!;
    expect(last.id).to.equal(`kek.${env.region}.23`);
    // In memory: the job as it ran (1 tenant rewrapped).
    for (let i = 2; i < 21; i++) {
      const j = jobs[i]!;
      expect(await env.stores.findJob(j.id), j.id).to.deep.equal({
        ...j,
        supersededBy: jobs[i + 1]!.id,
      });
    }
    // Fallen out of the history: still found, from the provider's KEK states.
    for (let i = 0; i < 2; i++) {
      const j = jobs[i]!;
      expect(await env.stores.findJob(j.id), j.id).to.include({
        status: 'done',
        total: 0,
        supersededBy: jobs[i + 1]!.id,
      });
    }
  });
});
