/**
 * A region's stores are bound to one keyring. Every replica of a region must use the region's
 * one keyring (the same `keyProvider.dir`, or KMS key): a replica started on another folder
 * holds none of the tenants' keys, and worse, the first call of a new tenant there would create
 * that tenant's key in the wrong keyring, where the region's other replicas never find it.
 *
 * So the first process to open a region's stores records its keyring's identity
 * (`KeyProviderInfo.keyringId`, derived from the keyring's first master key: the same for every
 * copy of it) in the region's storage, and every later one compares: a replica on another
 * keyring refuses to open the stores at all (boot fails, naming both), before any key is made.
 *
 * Stores made before bindings existed: the first process binds only if its keyring holds the keys
 * of most of the region's stores it samples (or the region has no store yet).
 *
 * Only a server makes a region's first binding. An operator command that opens a region outside
 * the server (`cellcds migrate`, `evidence`) passes `mayBind: false`: on a region no server
 * opened yet it cannot tell whether the keyring it found is the one the region's servers will
 * use, and binding the region to a wrong one would lock those servers out (they refuse to boot)
 * while the command writes data under keys they do not hold.
 */
import { KeyUnavailableError } from './errors.ts';
import type { StoreBackend } from './store-backend.ts';
import type { KeyProvider } from './types.ts';

/** Tenant stores sampled when a region with stores is bound for the first time. */
const FIRST_BIND_SAMPLE = 20;

const RUNBOOK = 'docs/operations.md, "A replica refuses its keyring"';

/** Options of `bindStoresToKeyring`. */
export interface BindStoresOptions {
  /**
   * May this process make the region's first binding (default true: a server)? False for an
   * operator command: a region with no binding yet is refused.
   */
  mayBind?: boolean;
}

/**
 * Binds the region's stores to the provider's keyring, or checks they are bound to it.
 * @throws KeyUnavailableError('keyring_mismatch') if they are bound to another keyring, or, at
 *   the first binding, if this keyring holds the keys of half or fewer of the sampled stores;
 *   KeyUnavailableError('keyring_unbound') if they are not bound yet and `mayBind` is false
 *   (nothing is bound then).
 */
export async function bindStoresToKeyring(
  backend: StoreBackend,
  provider: KeyProvider,
  now: () => Date,
  opts: BindStoresOptions = {},
): Promise<void> {
  const info = await provider.describe();
  const mine = info.keyringId;
  const mismatch = (bound: { keyringId: string; boundAt: string }) =>
    new KeyUnavailableError(
      'keyring_mismatch',
      `region ${backend.region}'s stores are bound to keyring ${bound.keyringId} (since ` +
        `${bound.boundAt}), but this process's keyring (${info.location}) is ${mine}: start every ` +
        `replica of the region on the region's one keyring (the same keyProvider.dir, or KMS ` +
        `key). Nothing was opened and no key was made (${RUNBOOK})`,
    );
  const bound = await backend.keyringBinding();
  if (bound) {
    if (bound.keyringId !== mine) {
      throw mismatch(bound);
    }
    return;
  }
  if (opts.mayBind === false) {
    throw new KeyUnavailableError(
      'keyring_unbound',
      `region ${backend.region}'s stores have no keyring binding yet (no server opened them), ` +
        `and this command does not make a region's first binding: it cannot tell whether this ` +
        `host's keyring (${info.location}, ${mine}) is the one the region's servers use. Start ` +
        `the region's servers once (cellcds serve --region ${backend.region}) with the region's ` +
        `real keyring, then run this command again with this host's keyProvider.dir for ` +
        `${backend.region} pointing at that same keyring. Nothing was bound or moved and no key ` +
        `was made (${RUNBOOK})`,
    );
  }
  const sample = (await backend.list()).slice(0, FIRST_BIND_SAMPLE);
  if (sample.length > 0) {
    const held = (await Promise.all(sample.map((t) => provider.hasTenantKey(t)))).filter(
      Boolean,
    ).length;
    // Most, not all: a store can lack its key for good (a deprovisioning killed between the
    // shred and the store's removal) or not yet (killed before its first write). But a keyring
    // that an older release's misconfigured replica keyed a few new tenants in holds few.
    if (held * 2 <= sample.length) {
      throw new KeyUnavailableError(
        'keyring_mismatch',
        `this process's keyring (${info.location}, ${mine}) holds the key of ${String(held)} of ` +
          `the ${String(sample.length)} tenant stores of region ${backend.region} it checked: ` +
          `it is not the region's keyring (another keyProvider.dir, or a keyring made afresh ` +
          `because the folder was empty). Nothing was opened and no key was made (${RUNBOOK})`,
      );
    }
  }
  const result = await backend.bindKeyring({ keyringId: mine, boundAt: now().toISOString() });
  if (result.keyringId !== mine) {
    throw mismatch(result);
  }
}
