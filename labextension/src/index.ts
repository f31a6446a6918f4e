/**
 * jupyter-gpuattach for JupyterLab 4: a status bar item showing the active
 * notebook kernel's GPU state, and a side panel with the pool and the user's
 * leases. Everything comes from the server extension's REST API.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { GPUModel } from './model';
import { GPUPanel } from './panel';
import { GPUStatusItem } from './statusitem';

const GPU_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161"><path d="M2 7h18a2 2 0 0 1 2 2v8a2 2 0 0 1-2 2H9v2H7v-2H4v2H2z' +
  'm4 3a3 3 0 1 0 0 6 3 3 0 0 0 0-6zm8 0a3 3 0 1 0 0 6 3 3 0 0 0 0-6z"/></g></svg>';

export const gpuIcon = new LabIcon({ name: 'jupyter-gpuattach:gpu', svgstr: GPU_SVG });

export const COMMAND_OPEN = 'gpuattach:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpuattach:plugin',
  description: 'GPU lease status bar item and pool panel for jupyter-gpuattach',
  autoStart: true,
  optional: [IStatusBar, INotebookTracker, ILabShell, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    tracker: INotebookTracker | null,
    labShell: ILabShell | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const model = new GPUModel();
    const panel = new GPUPanel(model);
    panel.title.icon = gpuIcon;
    app.shell.add(panel, 'right', { rank: 900 });
    restorer?.add(panel, 'jupyter-gpuattach-panel');

    app.commands.addCommand(COMMAND_OPEN, {
      label: 'Show the GPU pool and leases',
      execute: () => {
        if (labShell && panel.isVisible) {
          labShell.collapseRight();
        } else {
          app.shell.activateById(panel.id);
        }
      }
    });
    palette?.addItem({ command: COMMAND_OPEN, category: 'GPU' });

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
