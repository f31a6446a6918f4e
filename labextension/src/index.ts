/**
 * jupyter-gpuattach for JupyterLab 4: a status bar item showing the active
 * notebook kernel's GPU state, a side panel with the pool and the user's
 * leases, commands (attach, release, auto mode) for the active notebook's
 * kernel, notifications when a lease changes behind the user's back, and
 * settings for the default slice and idle timeout. Everything about leases
 * comes from the server extension's REST API.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { KernelMessage } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { CommandIDs, DEFAULT_SETTINGS, IGPUSettings, kernelCode, readSettings } from './commands';
import { GPUModel } from './model';
import { INotice } from './notices';
import { GPUPanel } from './panel';
import { GPUStatusItem } from './statusitem';

const GPU_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161"><path d="M2 7h18a2 2 0 0 1 2 2v8a2 2 0 0 1-2 2H9v2H7v-2H4v2H2z' +
  'm4 3a3 3 0 1 0 0 6 3 3 0 0 0 0-6zm8 0a3 3 0 1 0 0 6 3 3 0 0 0 0-6z"/></g></svg>';

export const gpuIcon = new LabIcon({ name: 'jupyter-gpuattach:gpu', svgstr: GPU_SVG });

export const COMMAND_OPEN = CommandIDs.open;
const PLUGIN_ID = 'jupyter-gpuattach:plugin';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'GPU lease status bar item, pool panel, commands and notifications for jupyter-gpuattach',
  autoStart: true,
  optional: [
    IStatusBar,
    INotebookTracker,
    ILabShell,
    ICommandPalette,
    ILayoutRestorer,
    ISettingRegistry
  ],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    tracker: INotebookTracker | null,
    labShell: ILabShell | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    registry: ISettingRegistry | null
  ) => {
    const model = new GPUModel();
    const panel = new GPUPanel(model, app.commands);
    panel.title.icon = gpuIcon;
    app.shell.add(panel, 'right', { rank: 900 });
    restorer?.add(panel, 'jupyter-gpuattach-panel');

    let settings: IGPUSettings = { ...DEFAULT_SETTINGS };
    if (registry) {
      void registry
        .load(PLUGIN_ID)
        .then(loaded => {
          const read = () => {
            settings = readSettings(loaded.composite as Record<string, unknown>);
          };
          read();
          loaded.changed.connect(read);
        })
        .catch(reason => console.warn('jupyter-gpuattach: settings not loaded', reason));
    }

    const kernel = () => tracker?.currentWidget?.sessionContext.session?.kernel ?? null;
    const notebookName = () => tracker?.currentWidget?.context.path ?? 'this notebook';

    /** Run `%gpu ...` in the active notebook's kernel; errors become a notification. */
    const runInKernel = async (action: 'attach' | 'auto-on' | 'auto-off', kernelId?: string) => {
      let target = kernel();
      if (kernelId && target?.id !== kernelId) {
        const widget = tracker?.find(w => w.sessionContext.session?.kernel?.id === kernelId);
        target = widget?.sessionContext.session?.kernel ?? null;
      }
      if (!target) {
        Notification.warning('GPU: open a notebook with a running kernel first.', {
          autoClose: 5000
        });
        return;
      }
      let code: string;
      try {
        code = kernelCode(action, settings);
      } catch (error) {
        Notification.error((error as Error).message);
        return;
      }
      const future = target.requestExecute({
        code,
        silent: false,
        store_history: false,
        stop_on_error: false
      });
      const lines: string[] = [];
      let failed = '';
      future.onIOPub = msg => {
        if (KernelMessage.isStreamMsg(msg)) {
          lines.push(msg.content.text.trim());
        } else if (KernelMessage.isErrorMsg(msg)) {
          failed = `${msg.content.ename}: ${msg.content.evalue}`;
        }
      };
      void model.refresh();
      await future.done;
      void model.refresh();
      const said = lines.filter(Boolean).join('\n');
      if (failed) {
        Notification.error(failed, { autoClose: false });
      } else if (action !== 'attach') {
        // What the kernel said ("GPU auto: off; ..."), the last line being its answer.
        const answer = said.split('\n').filter(line => line.startsWith('GPU auto'));
        Notification.info(answer[0] ?? `GPU: ${action} done`, { autoClose: 8000 });
      }
    };

    const hasKernel = () => kernel() !== null;
    app.commands.addCommand(CommandIDs.attach, {
      label: 'GPU: Attach to this notebook',
      caption:
        "Attach a GPU slice (the default slice of the settings) to the active notebook's kernel",
      isEnabled: () => hasKernel() && !model.leaseOf(kernel()?.id ?? null),
      execute: args => runInKernel('attach', (args.kernelId as string) || undefined)
    });
    app.commands.addCommand(CommandIDs.release, {
      label: 'GPU: Release from this notebook',
      caption: "Give the active notebook's GPU slice back now",
      isEnabled: () => !!model.leaseOf(kernel()?.id ?? null),
      execute: async () => {
        const lease = model.leaseOf(kernel()?.id ?? null);
        if (!lease) {
          Notification.info(`GPU: ${notebookName()} holds no GPU.`, { autoClose: 4000 });
          return;
        }
        try {
          await model.release(lease.lease_id, 'released from the JupyterLab command');
        } catch (error) {
          Notification.error(`GPU release failed: ${(error as Error).message}`);
        }
      }
    });
    app.commands.addCommand(CommandIDs.autoOn, {
      label: 'GPU: Auto mode on',
      caption:
        'Attach on the first cell that needs the GPU, release after the idle timeout of the settings',
      isEnabled: hasKernel,
      execute: () => runInKernel('auto-on')
    });
    app.commands.addCommand(CommandIDs.autoOff, {
      label: 'GPU: Auto mode off',
      caption: 'Stop attaching on demand (a slice held stays attached)',
      isEnabled: hasKernel,
      execute: () => runInKernel('auto-off')
    });
    app.commands.addCommand(CommandIDs.open, {
      label: 'GPU: Open the GPU panel',
      caption: 'Show the GPU pool and leases',
      execute: () => {
        if (labShell && panel.isVisible) {
          labShell.collapseRight();
        } else {
          app.shell.activateById(panel.id);
        }
      }
    });
    for (const command of [
      CommandIDs.attach,
      CommandIDs.release,
      CommandIDs.autoOn,
      CommandIDs.autoOff,
      CommandIDs.open
    ]) {
      palette?.addItem({ command, category: 'GPU' });
    }
    model.changed.connect(() => {
      app.commands.notifyCommandChanged(CommandIDs.attach);
      app.commands.notifyCommandChanged(CommandIDs.release);
    });
    tracker?.currentChanged.connect(() => app.commands.notifyCommandChanged());

    model.notices.connect((_, notice: INotice) => {
      const actions: Notification.IAction[] = [];
      if (notice.attachAgain) {
        actions.push({
          label: 'Attach again',
          caption: "Attach a GPU slice to that notebook's kernel",
          displayType: 'accent',
          callback: () => {
            void app.commands.execute(CommandIDs.attach, { kernelId: notice.kernelId });
          }
        });
      }
      Notification.emit(`${notice.message}`, notice.type, {
        autoClose: notice.type === 'error' ? false : 8000,
        actions
      });
    });

    if (statusBar) {
      const item = new GPUStatusItem(model, tracker, () => {
        void app.commands.execute(COMMAND_OPEN);
      });
      statusBar.registerStatusItem('jupyter-gpuattach:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => true
      });
    }
  }
};

export default plugin;
