export type * from './types.ts';
export * from './errors.ts';
export { openControlPlane } from './control-plane.ts';
export type {
  OpenControlPlaneOptions,
  PostgresOpenOptions,
  SqliteControlPlaneOptions,
} from './control-plane.ts';
export {
  CONTROL_PLANE_SCHEMA_PATTERN,
  DEFAULT_CONTROL_PLANE_SCHEMA,
  isPostgresUrl,
} from './control-plane-postgres.ts';
export { COPIED_TABLES, ControlPlaneCopyError, copyControlPlane } from './control-plane-copy.ts';
export type {
  ControlPlaneCopyRefusal,
  CopiedTable,
  CopyControlPlaneOptions,
  CopyControlPlaneResult,
  CopyProgress,
} from './control-plane-copy.ts';
export { ADMIN_TOKEN_PREFIX, hashAdminToken } from './admin-token-repository.ts';
export { ADMIN_ACTIONS, authorize, authorizeRole, authorizeTokenIssue } from './authorize.ts';
export {
  createTokenVerifier,
  ASYMMETRIC_ALGORITHMS,
  DEFAULT_ALGORITHMS,
} from './verify-client-token.ts';
export type { TokenVerifierOptions } from './verify-client-token.ts';
export {
  createMemoryReplayCache,
  DEFAULT_MEMORY_REPLAY_MAX_ENTRIES,
  replayCacheSize,
} from './replay-cache.ts';
export type { MemoryReplayCacheOptions } from './replay-cache.ts';
export { createJwksFetcher } from './jwks-fetcher.ts';
export type { JwksFetcherOptions } from './jwks-fetcher.ts';
export {
  assertCanaryPercentAllowed,
  canaryPercentMessage,
  MAX_CANARY_PERCENT,
  MAX_SUBSCRIPTIONS,
  TENANT_ID_PATTERN,
} from './tenant-validation.ts';
export * from './verify-id-token.ts';
export * from './redis-replay-cache.ts';
export {
  assertMayServe,
  assertNoResidencyProblems,
  checkFailover,
  checkFailoverDeclaration,
  checkMigration,
  checkPlacement,
  effectiveResidency,
  mayBackupTo,
  mayMigrate,
  mayServe,
  resolveResidency,
} from './residency.ts';
export type { ResidencySubject } from './residency.ts';
export { validateResidencyPolicy } from './tenant-validation.ts';
export * from './data-plane.ts';
