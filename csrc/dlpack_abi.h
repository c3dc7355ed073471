/* The DLPack 1.0 ABI, declared from the published specification
 * (https://dmlc.github.io/dlpack/latest/c_api.html).
 *
 * No packaged dlpack.h is installable from the registries we build against, so
 * the structs live here. tests/test_dlpack.py checks every size and field offset
 * against a ctypes transcription of the same specification, so a drift in
 * either place is caught.
 */
#ifndef SA_DLPACK_ABI_H
#define SA_DLPACK_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SA_DLPACK_MAJOR 1
#define SA_DLPACK_MINOR 0

/* Capsule names fixed by the Python array API standard. */
#define SA_CAPSULE_LEGACY "dltensor"
#define SA_CAPSULE_VERSIONED "dltensor_versioned"
#define SA_CAPSULE_LEGACY_USED "used_dltensor"
#define SA_CAPSULE_VERSIONED_USED "used_dltensor_versioned"

/* Bit 0 of DLManagedTensorVersioned.flags: the consumer must not write. */
#define SA_DLPACK_FLAG_READ_ONLY ((uint64_t)1 << 0)

typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17
} DLDeviceType;

typedef struct {
    int32_t device_type; /* a DLDeviceType; an int32 in the ABI */
    int32_t device_id;
} DLDevice;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6
} DLDataTypeCode;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;         /* base pointer; the first element is at data + byte_offset */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;     /* ndim entries */
    int64_t *strides;   /* ndim entries, in elements; NULL means compact row-major */
    uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

#ifdef __cplusplus
}
#endif

#endif /* SA_DLPACK_ABI_H */
