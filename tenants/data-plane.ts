/**
 * Public surface of the regional data plane (issue 4): per-tenant encrypted stores, the key
 * provider contract and its local-keyring default, rotation jobs, the audit chain, backups.
 * `tenants/index.ts` re-exports this file; see `tenants/DATA-PLANE.md`.
 */
export type * from './data-plane/types.ts';
export { openRegionStores } from './data-plane/region-stores.ts';
export { createLocalKeyProvider, keyringPath } from './data-plane/local-keyring.ts';
export type { LocalKeyProviderOptions } from './data-plane/local-keyring.ts';
export {
  KeyUnavailableError,
  RecordOpenError,
  BackupError,
  StoreBusyError,
  WrapLimitError,
} from './data-plane/errors.ts';
export { DEFAULT_WRAP_LIMITS } from './data-plane/wrap-limit.ts';
export type { WrapLimits, WrapLimitEvent } from './data-plane/wrap-limit.ts';
export type {
  KeyUnavailableReason,
  RecordOpenReason,
  BackupErrorReason,
} from './data-plane/errors.ts';
export {
  GENESIS_HASH,
  canonicalJson,
  chainHash,
  nextChainEntry,
  createChainVerifier,
  verifyChain,
} from './data-plane/hash-chain.ts';
export type {
  ChainEntry,
  ChainHead,
  ChainProblem,
  ChainVerification,
  ChainVerifier,
} from './data-plane/hash-chain.ts';
export {
  sealRecord,
  sealRecordBinary,
  sealRecordAs,
  sealLegacyRecord,
  openRecord,
  recordAad,
  generateDataKey,
} from './data-plane/record-cipher.ts';
export type { Envelope, EnvelopeForm } from './data-plane/record-cipher.ts';
export type { RecordAddress, SealingKey } from './data-plane/record-cipher.ts';
export { isFormat1, readBackupManifest, readManifestShape } from './data-plane/backup.ts';
export type { BackupManifest } from './data-plane/backup.ts';
export { isStoreUnavailableError, tenantSchemaName } from './data-plane/store-backend.ts';
export { migrateTenant, migrationStatePath, readMigrationState } from './data-plane/migration.ts';
export type {
  MigrateTenantOptions,
  MigrationPhase,
  MigrationProgress,
  MigrationRegion,
  MigrationState,
} from './data-plane/migration.ts';
