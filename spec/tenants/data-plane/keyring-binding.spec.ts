/**
 * A region's stores are bound to the keyring of the first process that opened them. A replica
 * started on another keyring folder used to open them, report ready, and answer every call of
 * an existing tenant with 503 `tenant_key_missing`; worse, a tenant new to the region got its key
 * made in that wrong keyring on its first call, so the region's correctly configured replicas
 * could never serve it. Now such a replica refuses to open the stores at all, before any key is
 * made; copies of the region's keyring (a restored backup of it) are the same keyring.
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import { createLocalKeyProvider, KeyUnavailableError } from '../../../tenants/data-plane.ts';
import type { KeyProvider } from '../../../tenants/data-plane.ts';
import {
  asInstance,
  forEachBackend,
  invocation,
  makeEnv,
  PG_URL,
  rejection,
  tmpDir,
} from './helpers.ts';
import type { Env } from './helpers.ts';

forEachBackend('tenants/ data plane: stores bound to the region keyring', (backend) => {
  let env: Env;
  let elsewhere: string;
  beforeEach(async () => {
    env = await makeEnv(backend);
    elsewhere = tmpDir();
  });
  afterEach(async () => {
    await env.close();
    fs.rmSync(elsewhere, { recursive: true, force: true });
  });

  const otherKeyring = (name = 'keys-other'): Promise<KeyProvider> =>
    createLocalKeyProvider({ keyDir: path.join(elsewhere, name), region: env.region });

  async function mismatch(p: Promise<unknown>): Promise<KeyUnavailableError> {
    const err = asInstance(await rejection(p), KeyUnavailableError);
    expect(err.reason, err.message).to.equal('keyring_mismatch');
    return err;
  }

  /** Removes the binding, as for stores made by a release that did not bind them. */
  async function unbind(): Promise<void> {
    if (backend === 'sqlite') {
      fs.rmSync(path.join(env.dataDir, env.region, '.keyring-binding.json'));
      return;
    }
    const db = new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false });
    try {
      await db.query(`DROP SCHEMA "${env.schemaPrefix}_region" CASCADE`);
    } finally {
      await db.close();
    }
  }

  it('has one keyring id per keyring: kept across a KEK rotation and by a copy of the file', async () => {
    const before = (await env.provider.describe()).keyringId;
    expect(before).to.match(/^kr-[0-9a-f]{32}$/);
    await env.provider.rotateKek();
    expect((await env.provider.describe()).keyringId).to.equal(before);

    await env.stores.store('acme').saveInvocation(invocation('inv-1'));
    const copyDir = path.join(elsewhere, 'keys-copy');
    fs.mkdirSync(copyDir, { mode: 0o700 });
    const name = `${env.region}.keyring.json`;
    fs.copyFileSync(path.join(env.keyDir, name), path.join(copyDir, name));
    fs.chmodSync(path.join(copyDir, name), 0o600);
    const copy = await createLocalKeyProvider({ keyDir: copyDir, region: env.region });
    expect((await copy.describe()).keyringId).to.equal(before);
    // The copy opens the region's stores and reads what the original wrote.
    const again = await env.reopen({ keyProvider: copy });
    expect((await again.store('acme').readInvocation('inv-1')).secret).to.deep.equal(
      invocation('inv-1').secret,
    );

    expect((await (await otherKeyring()).describe()).keyringId).to.not.equal(before);
  });

  it('refuses another keyring on a region with no store yet, naming both', async () => {
    const mine = (await env.provider.describe()).keyringId;
    const wrong = await otherKeyring();
    const wrongId = (await wrong.describe()).keyringId;
    const err = await mismatch(env.reopen({ keyProvider: wrong }));
    expect(err.message).to.include(mine).and.include(wrongId).and.include('keyProvider.dir');
    // The region's keyring still opens them, and a new tenant's key goes into it.
    const right = await env.reopen();
    await right.store('newco').saveInvocation(invocation('inv-1'));
    expect(await env.provider.hasTenantKey('newco')).to.equal(true);
    expect(await wrong.hasTenantKey('newco')).to.equal(false);
  });

  it('refuses another keyring on a region whose tenants are keyed', async () => {
    await env.stores.store('acme').saveInvocation(invocation('inv-1'));
    const wrong = await otherKeyring();
    await mismatch(env.reopen({ keyProvider: wrong }));
    expect(await wrong.hasTenantKey('acme')).to.equal(false);
  });

  it('binds stores made before bindings only to a keyring that holds one of their keys', async () => {
    await env.stores.store('acme').saveInvocation(invocation('inv-1'));
    await unbind();
    const wrong = await otherKeyring();
    const err = await mismatch(env.reopen({ keyProvider: wrong }));
    expect(err.message).to.match(/holds the key of 0 of the 1 tenant stores/);
    // The refusal bound nothing: the region's keyring binds them, then the other is refused.
    const right = await env.reopen();
    expect((await right.store('acme').readInvocation('inv-1')).id).to.equal('inv-1');
    await mismatch(env.reopen({ keyProvider: wrong }));
  });

  it("does not bind stores made before bindings to a keyring holding a few of their keys (an older release's misconfigured replica keyed new tenants there)", async () => {
    for (const t of ['acme', 'beta', 'gamma']) {
      await env.stores.store(t).saveInvocation(invocation(`${t}-1`));
    }
    await unbind();
    const wrong = await otherKeyring();
    await wrong.createTenantKey('gamma');
    const err = await mismatch(env.reopen({ keyProvider: wrong }));
    expect(err.message).to.match(/holds the key of 1 of the 3 tenant stores/);
    // The region's keyring holds them all: it binds them.
    await env.reopen();
    await mismatch(env.reopen({ keyProvider: wrong }));
  });

  it('lets exactly one of two keyrings bind an unbound region when both open it at once', async () => {
    await unbind();
    const a = await otherKeyring('keys-a');
    const b = await otherKeyring('keys-b');
    const results = await Promise.allSettled([
      env.reopen({ keyProvider: a }),
      env.reopen({ keyProvider: b }),
    ]);
    const won = results.filter((r) => r.status === 'fulfilled');
    expect(won, JSON.stringify(results.map((r) => r.status))).to.have.length(1);
    const lost = results.find((r) => r.status === 'rejected');
    expect(asInstance(lost?.reason, KeyUnavailableError).reason).to.equal('keyring_mismatch');
  });

  // An operator command (cellcds migrate, evidence) opens a region with mayBind: false: only a
  // server makes a region's first binding, so a keyring the command happened to find (or made)
  // never becomes the region's.
  it('with mayBind: false, refuses a region no process bound yet (keyring_unbound), naming it, and binds nothing', async () => {
    await unbind();
    const err = asInstance(await rejection(env.reopen({ mayBind: false })), KeyUnavailableError);
    // Its own reason: nothing says this keyring is not the region's (that is keyring_mismatch),
    // only that no server bound the region yet.
    expect(err.reason, err.message).to.equal('keyring_unbound');
    expect(err.message)
      .to.include(`region ${env.region}`)
      .and.include('no keyring binding yet')
      .and.include(path.join(env.keyDir, `${env.region}.keyring.json`))
      .and.match(/start the region's servers once/i);
    // Nothing was bound: another keyring still binds the (empty) region, as a first server would.
    await env.reopen({ keyProvider: await otherKeyring() });
    await mismatch(env.reopen());
  });

  it('with mayBind: false, refuses stores made before bindings too (no sampling)', async () => {
    await env.stores.store('acme').saveInvocation(invocation('inv-1'));
    await unbind();
    const err = asInstance(await rejection(env.reopen({ mayBind: false })), KeyUnavailableError);
    expect(err.reason, err.message).to.equal('keyring_unbound');
    expect(err.message).to.include('no keyring binding yet');
    // The region's keyring, opened by a server, binds them.
    const right = await env.reopen();
    expect((await right.store('acme').readInvocation('inv-1')).id).to.equal('inv-1');
  });

  it('with mayBind: false, opens a region bound to its keyring and refuses one bound to another', async () => {
    await env.stores.store('acme').saveInvocation(invocation('inv-1'));
    const op = await env.reopen({ mayBind: false });
    expect((await op.store('acme').readInvocation('inv-1')).id).to.equal('inv-1');
    await mismatch(env.reopen({ mayBind: false, keyProvider: await otherKeyring() }));
  });

  if (backend === 'postgres') {
    it('keeps the binding in <prefix>_region, which is never listed as a tenant store', async () => {
      await env.stores.store('acme').saveInvocation(invocation('inv-1'));
      const db = new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false });
      try {
        const rows = await db.query<{ region: string; keyring_id: string }>(
          `SELECT region, keyring_id FROM "${env.schemaPrefix}_region".keyring`,
          { type: QueryTypes.SELECT },
        );
        expect(rows).to.deep.equal([
          { region: env.region, keyring_id: (await env.provider.describe()).keyringId },
        ]);
      } finally {
        await db.close();
      }
      expect(await env.stores.listTenants()).to.deep.equal(['acme']);
    });
  }
});
