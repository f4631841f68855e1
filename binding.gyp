# CPU-only build of the addon through node-gyp, for machines without cmake (scripts/build-native.js falls
# back to it). It compiles the same sources as CMakeLists.txt minus the CUDA backend; the result reports
# cudaCompiled: false and runs on the CPU backend. The CUDA backend needs cmake (cmake-js).
{
  "targets": [
    {
      "target_name": "tfew",
      "sources": [
        "<!@(node -p \"require('fs').readdirSync('cuda/core').filter(f=>f.endsWith('.cc')).map(f=>'cuda/core/'+f).join(' ')\")",
        "<!@(node -p \"require('fs').readdirSync('cuda/io').filter(f=>f.endsWith('.cc')).map(f=>'cuda/io/'+f).join(' ')\")",
        "<!@(node -p \"require('fs').readdirSync('cuda/model').filter(f=>f.endsWith('.cc')).map(f=>'cuda/model/'+f).join(' ')\")",
        "<!@(node -p \"require('fs').readdirSync('cuda/cpu').filter(f=>f.endsWith('.cc')).map(f=>'cuda/cpu/'+f).join(' ')\")",
        "<!@(node -p \"require('fs').readdirSync('cuda/napi').filter(f=>f.endsWith('.cc')).map(f=>'cuda/napi/'+f).join(' ')\")",
        "cuda/gpu/no_cuda.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "cuda"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3"],
      "xcode_settings": { "GCC_ENABLE_CPP_EXCEPTIONS": "YES", "CLANG_CXX_LIBRARY": "libc++", "MACOSX_DEPLOYMENT_TARGET": "11.0" }
    }
  ]
}
