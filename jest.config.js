/** @type {import('jest').Config} */
// Two projects:
//   tfew           every test, on the addon npm built (GPU tests run on a real GPU, skip without one)
//   cuda-emulator  the GPU tests again, on the CUDA-emulator addon (build-emu/, `npm run build:emu`): the CUDA
//                  backend's kernels and cuBLAS calls executed on the CPU, so they are checked without a GPU
const common = {
  testEnvironment: 'node',
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.json' }] },
};

module.exports = {
  testTimeout: 120000,
  globalSetup: '<rootDir>/test/global-setup.js',
  reporters: ['default', '<rootDir>/test/summary-reporter.js'],
  projects: [
    { ...common, displayName: 'tfew', roots: ['<rootDir>/test'], testMatch: ['**/*.test.ts'] },
    {
      ...common,
      displayName: 'cuda-emulator',
      roots: ['<rootDir>/test/gpu'],
      testMatch: ['**/*.test.ts'],
      setupFiles: ['<rootDir>/test/gpu/emulator-setup.js'],
    },
  ],
};
