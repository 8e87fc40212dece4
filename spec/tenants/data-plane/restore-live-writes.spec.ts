/**
 * A restore never drops a record written while it runs. A restore puts the backup's copy in
 * place of the live store: records written since the backup are given up by design (that is
 * what a restore does), but a record written WHILE the restore stages its copy was acknowledged
 * (its call answered 200) after the operator asked for the restore, and the swap used to drop it
 * silently (40 s of a busy tenant's calls on PostgreSQL, on every replica).
 *
 * - On the restoring process the tenant's store is blocked from the start of the restore, not
 *   only for the swap: a write there is refused (ConflictError) while the copy is staged.
 * - On PostgreSQL another replica keeps writing to the live schema: the swap, once it holds the
 *   lock every write takes, compares the live store with what it held when the restore began;
 *   a record written meanwhile aborts the restore (ConflictError naming what to do), nothing is
 *   replaced, and that record stays readable.
 */
import { expect } from 'chai';
import { ConflictError } from '../../../tenants/index.ts';
import { StoreBusyError, createLocalKeyProvider } from '../../../tenants/data-plane.ts';
import type { RegionStores } from '../../../tenants/data-plane.ts';
import { PG_URL, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

async function replica(env: Env): Promise<RegionStores> {
  const keyProvider = await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region });
  return env.reopen({ keyProvider });
}

forEachBackend('tenants/ data plane: writes during a restore', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => {
    await env.close();
  });

  it('blocks the tenant on the restoring process from the start: a write while it stages is refused', async () => {
    const s = env.stores.store('t1');
    await s.saveInvocation(invocation('inv-1'));
    const backup = await env.stores.backupTenant('t1', env.backupDir);
    await s.saveInvocation(invocation('inv-2')); // after the backup: given up by the restore
    const restoring = env.stores.restoreTenant(backup.path);
    const during = await rejection(s.saveInvocation(invocation('inv-3')));
    expect(during).to.be.instanceOf(StoreBusyError);
    expect(during).to.be.instanceOf(ConflictError);
    expect(during.message).to.include('being restored');
    await restoring;
    expect((await s.listInvocations({})).map((i) => i.id)).to.deep.equal(['inv-1']);
    // Once restored, the tenant takes writes again.
    await s.saveInvocation(invocation('inv-4'));
  });
});

describe('tenants/ data plane: a write on another replica during a PostgreSQL restore', function () {
  this.timeout(60_000);
  if (!PG_URL) {
    it('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    return;
  }
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv('postgres');
  });
  afterEach(async () => {
    await env.close();
  });

  it('aborts the swap (ConflictError), keeping the live store and the record written meanwhile', async () => {
    const a = env.stores;
    const b = await replica(env);
    await a.store('t1').saveInvocation(invocation('inv-1'));
    const backup = await a.backupTenant('t1', env.backupDir);
    // Another replica answers a call while the copy is staged.
    const err = await rejection(
      a.restoreTenant(backup.path, {
        onStaged: async () => {
          await b.store('t1').saveInvocation(invocation('inv-2'));
        },
      }),
    );
    expect(err).to.be.instanceOf(ConflictError);
    expect(err.message).to.include('written while the restore ran');
    expect(err.message).to.include('suspend');
    expect((await b.store('t1').listInvocations({})).map((i) => i.id)).to.deep.equal([
      'inv-1',
      'inv-2',
    ]);
    expect(await b.store('t1').readInvocation('inv-2')).to.not.equal(undefined);
  });

  it('swaps when nothing was written meanwhile', async () => {
    const a = env.stores;
    await a.store('t1').saveInvocation(invocation('inv-1'));
    const backup = await a.backupTenant('t1', env.backupDir);
    await a.store('t1').saveInvocation(invocation('inv-2')); // before the restore: given up
    const restored = await a.restoreTenant(backup.path);
    expect(restored.tenant).to.equal('t1');
    expect((await a.store('t1').listInvocations({})).map((i) => i.id)).to.deep.equal(['inv-1']);
  });
});
