// Typed native errors. Every failure inside the engine throws TfewError with a stable code; the N-API
// layer turns it into a rejected promise whose Error carries `code`, and lib/errors.ts maps the code to a
// JS error class. Nothing in the engine aborts the process.
#pragma once
#include <stdexcept>
#include <string>

namespace tfew {

enum class ErrorCode {
  InvalidArgument,   // bad shapes, unknown token ids, wrong batch layout
  InvalidModel,      // a checkpoint that is not a T5 / missing or misshaped tensor
  InvalidAdapter,    // adapter does not fit the model
  Io,                // file cannot be opened / mapped / is truncated
  Disposed,          // model used after dispose()
  OutOfMemory,       // host or device allocation failed
  DeviceUnavailable, // CUDA requested but no usable GPU / driver / cuBLAS
  Cuda,              // a CUDA or cuBLAS call failed
  Internal,
};

inline const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::InvalidArgument: return "E_INVALID_ARGUMENT";
    case ErrorCode::InvalidModel: return "E_INVALID_MODEL";
    case ErrorCode::InvalidAdapter: return "E_INVALID_ADAPTER";
    case ErrorCode::Io: return "E_IO";
    case ErrorCode::Disposed: return "E_DISPOSED";
    case ErrorCode::OutOfMemory: return "E_OUT_OF_MEMORY";
    case ErrorCode::DeviceUnavailable: return "E_DEVICE_UNAVAILABLE";
    case ErrorCode::Cuda: return "E_CUDA";
    default: return "E_INTERNAL";
  }
}

class TfewError : public std::runtime_error {
 public:
  TfewError(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

[[noreturn]] inline void fail(ErrorCode code, const std::string& message) { throw TfewError(code, message); }

#define TFEW_CHECK_ARG(cond, msg)                                         \
  do {                                                                    \
    if (!(cond)) ::tfew::fail(::tfew::ErrorCode::InvalidArgument, (msg)); \
  } while (0)

}  // namespace tfew
